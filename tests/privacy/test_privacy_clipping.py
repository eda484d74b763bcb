"""Per-example clipping bounds every example's contribution whatever the global weights
(bract.privacy.clipping): weights crafted to overflow on one chosen record make that
record's gradient NaN, and the released update must stay finite, with the record adding
nothing, in every grad-sample mode; otherwise the NaN update is a membership oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bract.privacy import PrivateTrainer
from bract.privacy.bookkeeping import BookKeepingClipper
from tests.privacy.helpers import DP_WARNINGS

pytestmark = DP_WARNINGS

MODES = ("bk", "hooks", "ghost")
FMAX = float(torch.finfo(torch.float32).max)
#: The noise stream's key in the tests that fix it (both runs then add the same noise).
NOISE_KEY = bytes(range(32))


class Trigger(nn.Module):
    """A model whose loss overflows only on records whose feature 0 (pixel (2, 2) for
    the convolution) exceeds ``threshold``: a hidden unit ``relu(x_0 - threshold)``
    feeds logit 0 with weight FMAX, so every other record's gradient stays moderate."""

    def __init__(self, kind: str, threshold: float, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.kind = kind
        if kind == "linear":  # the red team's model: logit 0 = (FMAX / threshold) x_0
            self.head = nn.Linear(4, 3)
            with torch.no_grad():
                self.head.weight[0] = 0.0
                self.head.weight[0, 0] = FMAX / threshold
                self.head.bias[0] = 0.0
            return
        if kind == "mlp":
            self.body = nn.Linear(4, 5)
            with torch.no_grad():
                self.body.weight[0] = 0.0
                self.body.weight[0, 0] = 1.0
                self.body.bias[0] = -threshold
            width = 5
        else:
            self.body = nn.Conv2d(1, 2, 3)
            with torch.no_grad():
                self.body.weight[0] = 0.0
                self.body.weight[0, 0, 1, 1] = 1.0  # output (1, 1) reads pixel (2, 2)
                self.body.bias[0] = -threshold
            width = 2 * 3 * 3
        self.head = nn.Linear(width, 3)
        with torch.no_grad():
            # Only the trigger unit's value (0 unless the record crosses the threshold)
            # meets the huge weight: hidden unit 0, or channel 0 at position (1, 1).
            self.head.weight[:, 0 if kind == "mlp" else 4] = 0.0
            self.head.weight[0, 0 if kind == "mlp" else 4] = FMAX

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.head(x)
        return self.head(torch.relu(self.body(x)).flatten(1))


def records(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` ordinary records (every feature within +-3) and labels."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4) if kind in ("linear", "mlp") else (n, 1, 5, 5)
    x = torch.tanh(torch.randn(shape, generator=g)) * 3
    return x, torch.randint(0, 3, (n,), generator=g)


def with_trigger(kind: str, x: torch.Tensor, i: int, threshold: float) -> torch.Tensor:
    """``x`` with record ``i`` past the model's threshold (the target)."""
    x = x.clone()
    if kind in ("linear", "mlp"):
        x[i, 0] = 2 * threshold
    else:
        x[i, 0, 2, 2] = 2 * threshold
    return x


def released_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str,
                    clip: float, *, size: int, sigma: float = 0.0) -> torch.Tensor:
    """The flat update one DP-SGD round of bract's trainer releases on (x, y): every
    record sampled (q = 1 with the public size bound ``size``), one step, SGD at lr 1,
    the criterion's 'sum' (so the update is minus the noisy clipped sum); with
    ``sigma`` > 0 the noise stream is keyed by :data:`NOISE_KEY`."""
    m = copy.deepcopy(model)
    before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
    trainer = PrivateTrainer(
        m, torch.optim.SGD(m.parameters(), lr=1.0),
        DataLoader(TensorDataset(x, y), batch_size=size), noise_multiplier=sigma,
        max_grad_norm=clip, delta=1e-5, grad_sample_mode=mode, public_size=size,
        criterion=nn.CrossEntropyLoss(reduction="sum"), noise_prefetch=False,
        rule_overlap=False, batch_parts=1 if mode == "bk" else None,
        sampling_seed=0 if sigma == 0 else None,
    )
    if sigma:
        trainer._noise_source._start(NOISE_KEY, 0)  # the same noise for every run
    outcome = trainer.train_round(1)
    assert outcome.trained and outcome.event is not None and outcome.event.steps == 1
    return before - torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["linear", "mlp", "cnn"]),
       seed=st.integers(0, 10_000), target=st.integers(0, 4),
       threshold=st.floats(6.0, 40.0), clip=st.sampled_from([0.1, 1.0, 10.0]))
def test_weights_that_overflow_on_one_record_leave_every_contribution_within_the_clip(
        kind, mode, seed, target, threshold, clip) -> None:
    """For weights crafted to make one chosen record's loss overflow (NaN gradient), the
    clipped sum is finite, that record adds exactly nothing, and removing any record
    moves the sum by at most C: each example's clipped contribution has norm <= C."""
    n = 5
    x, y = records(kind, n, seed)
    x = with_trigger(kind, x, target, threshold)
    model = Trigger(kind, threshold, seed)
    with torch.no_grad():  # the crafted weights do what they are meant to
        logits = model(x)
    assert not torch.isfinite(logits[target]).all()
    assert torch.isfinite(torch.cat([logits[:target], logits[target + 1:]])).all()
    total = released_update(model, x, y, mode, clip, size=n)
    assert torch.isfinite(total).all()
    for i in range(n):
        keep = [j for j in range(n) if j != i]
        without = released_update(model, x[keep], y[keep], mode, clip, size=n)
        contribution = float((total - without).norm())
        assert contribution <= clip * (1 + 1e-4) + 1e-5
        if i == target:
            assert contribution <= 1e-5 * clip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["linear", "cnn"])
def test_the_nan_canary_no_longer_tells_whether_the_target_was_in(kind, mode) -> None:
    """The red team's canary: a model whose loss is NaN on the target record only. With
    the noise stream fixed, the private update with the target is finite and differs
    from the update without it by at most C (here by nothing: its gradient is not
    finite, so it is left out); an ordinary extra record moves it by at most C too."""
    threshold, clip, n = 15.0, 1.0, 8
    x, y = records(kind, n + 1, seed=3)
    model = Trigger(kind, threshold, seed=3)
    target = with_trigger(kind, x, n, threshold)
    size = n + 1
    absent = released_update(model, x[:n], y[:n], mode, clip, size=size, sigma=1.0)
    present = released_update(model, target, y, mode, clip, size=size, sigma=1.0)
    ordinary = released_update(model, x, y, mode, clip, size=size, sigma=1.0)
    assert torch.isfinite(absent).all() and torch.isfinite(present).all()
    assert float((present - absent).norm()) <= 1e-5
    assert 0 < float((ordinary - absent).norm()) <= clip * (1 + 1e-4)


def test_a_patient_whose_gradient_is_not_finite_leaves_the_other_patients_clipped_sums() -> None:
    """Patient groups in book-keeping: a NaN in one patient's Gram-matrix row must not
    reach another patient's norm (0 * NaN is NaN), so every other patient's clipped
    sum is what it is without that patient."""
    threshold, clip = 10.0, 1.0
    x, y = records("mlp", 6, seed=5)
    x = with_trigger("mlp", x, 0, threshold)
    model = Trigger("mlp", threshold, seed=5)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])

    def clipped(rows: list[int], patients: torch.Tensor) -> tuple[dict, torch.Tensor]:
        m = copy.deepcopy(model)
        clipper = BookKeepingClipper(m, clip, overlap=False)
        try:
            factors = clipper.backward(
                nn.CrossEntropyLoss(reduction="none")(m(x[rows]), y[rows]), len(rows),
                groups=patients)
        finally:
            clipper.remove()
        return {k: p.grad.clone() for k, p in m.named_parameters()}, factors

    everyone, factors = clipped(list(range(6)), groups)
    others, _ = clipped([2, 3, 4, 5], groups[2:] - 1)
    assert torch.equal(factors[:2], torch.zeros(2))
    assert bool((factors[2:] > 0).all())
    for k, grad in everyone.items():
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, others[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_an_update_stays_finite_when_every_sampled_gradient_overflows(mode) -> None:
    """Weights that overflow on every record of the batch: every factor is 0 and the
    released update is the noise alone (finite, of the DP-SGD scale), not NaN."""
    threshold = 15.0
    x, y = records("linear", 6, seed=1)
    for i in range(6):
        x = with_trigger("linear", x, i, threshold)
    noise_only = released_update(Trigger("linear", threshold, seed=1), x, y, mode, 1.0,
                                 size=6, sigma=1.0)
    assert torch.isfinite(noise_only).all()
    assert 0.3 < float(noise_only.std()) < 2.0  # sigma * C = 1, over 15 entries


# ------------------------------------------- norms that cancel: Gram sums, crafted weights

class Offset(nn.Module):
    """The crafted weights of a cancelling Gram sum: a hidden Linear whose bias (the
    common ``offset``) dwarfs the differences between records, so its outputs, the
    head's inputs, are huge and nearly equal; the head's two rows are equal, so both
    logits are equal and a record's output gradient is ``+-(1/2, -1/2)`` by label (by
    position, for a sequence). A patient holding both labels, or a sequence, has a
    summed head gradient far smaller than its rows: ``sum_{r,s}(g_r.g_s)(a_r.a_s)``
    cancels."""

    def __init__(self, offset: float, seed: int, d: int = 6, h: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(d, h)
        self.head = nn.Linear(h, 2)
        with torch.no_grad():
            self.body.weight.normal_(0.0, 30.0)
            self.body.bias.fill_(offset)
            self.head.weight[1] = self.head.weight[0]
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.relu(self.body(x)))
        if out.dim() == 2:
            return out
        # a sequence: positions taken with alternating signs, so the output gradients
        # of one record's positions are opposite and its own Gram sum cancels
        signs = (-1.0) ** torch.arange(out.shape[1], dtype=out.dtype)
        return (out * signs[:, None]).sum(dim=1)


def exact_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                units: torch.Tensor) -> torch.Tensor:
    """Each unit's (record's or patient's) exact gradient norm, formed explicitly in
    float64 from the float32 values the layers saw (inputs a_r, output gradients g_r):
    sqrt(sum over Linear layers of ||sum_r g_r a_r^T||^2 + ||sum_r g_r||^2)."""
    m = copy.deepcopy(model)
    seen: dict[nn.Module, list] = {}

    def keep(module, inputs, output):
        seen[module] = [inputs[0].detach()]
        output.register_hook(lambda g: seen[module].append(g.detach()))

    handles = [layer.register_forward_hook(keep) for layer in (m.body, m.head)]
    nn.CrossEntropyLoss(reduction="sum")(m(x), y).backward()
    for h in handles:
        h.remove()
    count = int(units.max()) + 1
    sq = torch.zeros(count, dtype=torch.float64)
    for a, g in seen.values():
        rows = g[0].numel() // g.shape[-1]
        a64 = a.reshape(-1, a.shape[-1]).double()
        g64 = g.reshape(-1, g.shape[-1]).double()
        owner = units.repeat_interleave(rows)
        for p in range(count):
            mine = owner == p
            w = g64[mine].t() @ a64[mine]
            sq[p] += (w ** 2).sum() + (g64[mine].sum(0) ** 2).sum()
    return sq.sqrt()


@settings(max_examples=12, deadline=None)
@given(offset=st.sampled_from([1e3, 3e5, 3e6, 1e8, 1e10]), seed=st.integers(0, 10_000),
       sequence=st.booleans(), patients=st.booleans(),
       clip=st.sampled_from([0.1, 1.0]), mode=st.sampled_from(["bk", "ghost"]))
def test_a_gram_sum_that_cancels_still_clips_each_term_to_c(
        offset, seed, sequence, patients, clip, mode) -> None:
    """Property: for weights that make a Linear layer's Gram-sum norm cancel (huge,
    nearly equal inputs; opposite output gradients within a patient or a sequence),
    every unit's factor times its exact float64 gradient norm is at most
    C * (1 + 1e-5), in book-keeping (records of sequences, patients of records or of
    sequences) and ghost clipping (records of sequences; patients are refused there)."""
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleModuleFastGradientClipping,
    )

    from bract.privacy.clipping import GhostClipping

    if mode == "ghost":
        patients, sequence = False, True  # its only Gram sum: a Linear over a sequence
    g = torch.Generator().manual_seed(seed)
    n = 6
    x = torch.randn((n, 4, 6) if sequence else (n, 6), generator=g)
    y = torch.tensor([0, 1] * (n // 2))  # a patient (records 2k, 2k+1) holds both labels
    units = torch.arange(n) // 2 if patients else torch.arange(n)
    model = Offset(offset, seed)
    exact = exact_terms(model, x, y, units)
    m = copy.deepcopy(model)
    if mode == "bk":
        clipper = BookKeepingClipper(m, clip, overlap=False)
        try:
            factors = clipper.backward(nn.CrossEntropyLoss(reduction="none")(m(x), y), n,
                                       groups=units if patients else None)
        finally:
            clipper.remove()
    else:
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        hooks = GradSampleModuleFastGradientClipping(m, max_grad_norm=clip,
                                                     use_ghost_clipping=True,
                                                     loss_reduction="sum")
        optimizer = torch.optim.SGD(hooks.parameters(), lr=1.0)
        from opacus.optimizers import DPOptimizerFastGradientClipping

        dp_opt = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=0.0,
                                                 max_grad_norm=clip, expected_batch_size=n,
                                                 loss_reduction="sum")
        ghost = GhostClipping(m, clip)  # its hooks see the forward pass
        loss = DPLossFastGradientClipping(hooks, dp_opt, nn.CrossEntropyLoss(reduction="sum"),
                                          "sum")(hooks(x), y)
        try:
            factors = ghost.backward(loss)
        finally:
            ghost.remove()
            hooks.remove_hooks()
    unit_factor = torch.zeros(len(exact), dtype=torch.float64)
    unit_factor[units] = factors.double()
    terms = unit_factor * exact
    assert bool((terms <= clip * (1 + 1e-5)).all()), (terms, exact)


def test_the_matmul_roundoff_is_never_below_what_torchs_settings_allow(monkeypatch) -> None:
    """The rounding margin of the clipped sum takes the coarsest precision torch may use
    for float32 products: TF32 or bfloat16 passes under the legacy or the per-backend
    setting, TF32 forced in cuBLAS by the environment, and the coarsest whenever the
    settings cannot be read (torch refuses to mix its legacy and newer APIs)."""
    from types import SimpleNamespace

    from bract.privacy import norm_bounds

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    exact = torch.finfo(torch.float32).eps / 2
    assert norm_bounds.matmul_unit_roundoff(torch.float64, cpu) == torch.finfo(
        torch.float64).eps / 2
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert norm_bounds.matmul_unit_roundoff(torch.float32, cpu) == exact
    for setting, want in (("bf16", 2.0 ** -8), ("tf32", 2.0 ** -11)):
        monkeypatch.setattr(torch.backends.mkldnn, "matmul",
                            SimpleNamespace(fp32_precision=setting))
        assert norm_bounds.matmul_unit_roundoff(torch.float32, cpu) == want
    monkeypatch.setattr(torch.backends.mkldnn, "matmul", SimpleNamespace(fp32_precision="ieee"))
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    assert norm_bounds.matmul_unit_roundoff(torch.float32, cuda) == 2.0 ** -11
    assert norm_bounds.matmul_unit_roundoff(torch.float32, cpu) == exact
    monkeypatch.delenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")

    def mixed() -> str:
        raise RuntimeError("PyTorch is checking the matmul precision without a specific "
                           "backend name")

    monkeypatch.setattr(torch, "get_float32_matmul_precision", mixed)
    assert norm_bounds.matmul_unit_roundoff(torch.float32, cpu) == 2.0 ** -8
