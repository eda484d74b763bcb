"""White-box audit with gradient canaries, on the hospital's real model and trainer.

The black-box audit (:mod:`bract.audit.empirical`) sees only the final model of a
linear stand-in: it catches only gross failures. This audit follows the white-box
setting of Steinke, Nasr and Jagielski (2023, "Privacy Auditing with One (1)
Training Run") and Nasr et al. (2023): ``m`` **Dirac gradient canaries**, each a
gradient of norm exactly C (the clip norm) on one coordinate of the model's
parameters that no other canary uses. A secret fair coin (``secrets``) decides
which canaries are members; a member is Poisson-sampled at every step with the
same rate q as a record and, when sampled, its gradient is added to the clipped
sum *before* the noise, inside the real DP optimizer of
:class:`~bract.privacy.training.PrivateTrainer` (the task's real model, data,
clipping mode, secure noise and sampler, and its ledger).

By default the audited training is one full-batch step (every record in, q = 1):
the records' clipped sum is then a function of the data and the model, which DP's
adversary knows, and the auditor subtracts it from each canary's coordinate.

The auditor sees every step's noisy gradient (white box) and scores each canary
by the likelihood ratio of "sampled with rate q" against "absent" over all steps,
``sum_t log(1 - q + q exp((x_t C - C^2 / 2) / s^2))`` with ``x_t`` its coordinate of
the noisy sum and ``s = sigma C`` the noise the ledger claims: the Neyman-Pearson
test for one canary. The one-run statistics (:mod:`bract.audit.one_run`) turn the
ranking of members by score into a lower bound on epsilon at a stated confidence.

A second, white-box check measures the noise itself on the absent canaries'
coordinates (pure noise once the known sum is subtracted) and bounds its standard
deviation from above at the stated confidence (chi-square); a bound below what the
ledger records refutes the ledger. It assumes the noise is Gaussian with mean 0.

A third figure, the **Gaussian-fit lower bound**, follows Nasr et al. (2023): it
assumes what the ledger claims about the mechanism's *shape* (each step adds
Gaussian noise of mean 0 to the clipped sum, and a member canary shifts its
coordinate by a constant) and measures its two *sizes*: the noise's standard
deviation from above (the chi-square bound of the noise check) and the members'
shift from below (a one-sided bound on their mean, from the same noise bound). The
ratio is an effective noise multiplier at least as large as the truth, and the
accountant's epsilon for it, at the ledger's sample rate and steps, is a lower
bound on the mechanism's epsilon at the stated confidence under that assumption.
It is computed for full-batch training (q = 1), where the auditor knows the
records' clipped sum; with q < 1 it is not reported.

``noise_scale`` makes the training add ``noise_scale`` times the noise the ledger
records (0.5: the "noise halved" bug), to show what the audit catches.

What it can show: a lower bound above the claim proves, at the stated confidence,
that the training is less private than its ledger says. What it cannot: that the
claim holds. The real records' gradients on a canary's coordinate are background
the score does not remove.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from bract.audit.empirical import secret_bits
from bract.audit.one_run import DEFAULT_GUESS_FRACTIONS, GuessOutcome, audit_scores

__all__ = ["GradientCanaryAuditConfig", "GradientCanaryAuditReport", "noise_ratio",
           "run_gradient_canary_audit"]

SETTING = ("Dirac gradient canaries (norm C, one coordinate each) inserted before the noise "
           "in the real DP optimizer; white-box likelihood-ratio score over every step; one run")


@dataclass(frozen=True)
class GradientCanaryAuditConfig:
    """What to audit: a built-in task's DP-SGD at a claimed epsilon (or noise), with
    ``canaries`` gradient canaries; ``noise_scale`` < 1 trains with less noise than
    the ledger records (to show the audit catching it)."""

    dataset: str = "synthetic"
    samples: int | None = 2400
    canaries: int = 5000
    target_epsilon: float | None = 2.0
    noise_multiplier: float | None = None
    noise_scale: float = 1.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    #: One full-batch step (every record in, q = 1): the records' clipped sum is then
    #: known to the adversary and subtracted, and the canary test is at its tightest.
    epochs: int = 1
    batch_size: int | None = None
    grad_sample_mode: str = "auto"
    confidence: float = 0.95
    seed: int = 0
    guess_fractions: tuple[float, ...] = DEFAULT_GUESS_FRACTIONS

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and noise_multiplier")
        if self.canaries < 10:
            raise ValueError(f"canaries must be >= 10 (got {self.canaries})")
        for name in ("samples", "batch_size"):  # None: the default; never 0 for it
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value}); leave it out for the "
                                 "default")
        if not (math.isfinite(self.noise_scale) and self.noise_scale > 0):
            raise ValueError(f"noise_scale must be a finite number > 0 (got "
                             f"{self.noise_scale!r})")


@dataclass(frozen=True)
class GradientCanaryAuditReport:
    """What the audit found: the claim, the lower bound, and how it was obtained."""

    dataset: str
    setting: str
    canaries: int
    members: int
    noise_multiplier: float
    noise_scale: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    claimed_epsilon: float
    confidence: float
    epsilon_lower: float
    best: GuessOutcome
    seconds: float
    #: The noise measured on the absent canaries' coordinates, as a multiple of the
    #: noise the ledger records: the estimate and its upper confidence bound.
    noise_ratio: float
    noise_ratio_upper: float
    grid: list[GuessOutcome] = field(default_factory=list)
    #: The Gaussian-fit lower bound on epsilon at ``confidence`` (NaN when q < 1), the
    #: members' measured shift over C (estimate), and the effective noise multiplier it
    #: was computed for (an upper bound on the true one, under the Gaussian assumption).
    epsilon_gaussian_fit: float = math.nan
    shift_ratio: float = math.nan
    noise_multiplier_fit: float = math.nan

    @property
    def violation(self) -> bool:
        """Whether the audit refutes the ledger: the lower bound exceeds the claimed
        epsilon, or the noise measured is below what the ledger records (at the
        stated confidence)."""
        return self.epsilon_lower > self.claimed_epsilon or self.noise_ratio_upper < 1.0

    def to_plain(self) -> dict[str, Any]:
        """Plain dict (JSON)."""
        out = asdict(self)
        out["violation"] = self.violation
        return out


class _Canaries:
    """The canaries' coordinates, coins, sampling and running scores."""

    def __init__(self, params: list[Any], m: int, clip: float, sigma: float,
                 noise_scale: float, sample_rate: float) -> None:
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        if total < m:
            raise ValueError(f"the model has {total} trainable parameters, fewer than the "
                             f"{m} canaries (one coordinate each): use fewer canaries")
        rng = np.random.default_rng(secrets.randbits(64))  # where canaries sit: not secret
        flat = np.sort(rng.choice(total, size=m, replace=False))
        offsets = np.cumsum([0, *sizes])
        self.where: list[tuple[Any, np.ndarray, np.ndarray]] = []
        for i, p in enumerate(params):
            mine = np.flatnonzero((flat >= offsets[i]) & (flat < offsets[i + 1]))
            if len(mine):
                self.where.append((p, mine, flat[mine] - offsets[i]))
        self.members = secret_bits(m)  # the secret coins
        self.m, self.clip, self.q = m, float(clip), float(sample_rate)
        self.sigma, self.noise_scale = float(sigma), float(noise_scale)
        self.scores = np.zeros(m)
        #: Sum of squares and count of the noisy sum on absent canaries' coordinates.
        self.noise_ss, self.noise_count = 0.0, 0
        #: Sum and count of the noisy sum on member canaries' coordinates in the steps
        #: that inserted them (the records' known sum subtracted; q = 1 only).
        self.shift_sum, self.shift_count = 0.0, 0

    def hook(self, optimizer: Any) -> None:
        """Wrap the DP optimizer's noise step: canaries in before it, scores after."""
        import torch

        from bract.privacy.sampling import SecurePoissonSampler

        optimizer.noise_multiplier = self.sigma * self.noise_scale  # what it really adds
        draw = SecurePoissonSampler(self.m, self.q, 1 << 30)
        add_noise = optimizer.add_noise
        s2 = (self.sigma * self.clip) ** 2  # the noise variance the ledger claims
        log_keep = math.log1p(-self.q) if self.q < 1 else -math.inf
        log_q = math.log(self.q)

        def add_noise_with_canaries() -> None:
            sampled = np.zeros(self.m, dtype=bool)
            sampled[draw.draw()] = True
            sampled &= self.members
            # With every record in every step (q = 1) the records' clipped sum is a
            # function of the data and the model alone, which DP's adversary knows:
            # the auditor subtracts it. (With q < 1 it depends on the secret sample.)
            background = [
                p.summed_grad.detach().reshape(-1)[torch.as_tensor(
                    coords, device=p.summed_grad.device)].double().cpu().numpy()
                if self.q >= 1 else 0.0 for p, _, coords in self.where]
            for p, ids, coords in self.where:
                hit = sampled[ids]
                if hit.any():
                    idx = torch.as_tensor(coords[hit], device=p.summed_grad.device)
                    p.summed_grad.view(-1)[idx] += self.clip
            add_noise()
            for (p, ids, coords), known in zip(self.where, background, strict=True):
                x = p.grad.detach().reshape(-1)[torch.as_tensor(coords, device=p.grad.device)]
                x = x.double().cpu().numpy() - known
                z = (x * self.clip - self.clip ** 2 / 2) / s2
                self.scores[ids] += np.logaddexp(log_keep, log_q + z)
                absent = ~self.members[ids]
                self.noise_ss += float(np.sum(x[absent] ** 2))
                self.noise_count += int(absent.sum())
                if self.q >= 1:
                    inserted = sampled[ids]
                    self.shift_sum += float(np.sum(x[inserted]))
                    self.shift_count += int(inserted.sum())

        optimizer.add_noise = add_noise_with_canaries


def run_gradient_canary_audit(
    config: GradientCanaryAuditConfig,
    on_step: Callable[[int, int], None] | None = None,
) -> GradientCanaryAuditReport:
    """Train the task once with gradient canaries and bound epsilon from below.

    Guarantee: if the training is (epsilon, delta)-DP as its ledger claims,
    ``epsilon_lower`` exceeds epsilon with probability at most ``(1 - confidence) / 2``
    (over the secret coins and the training's randomness); if its noise is Gaussian
    with the standard deviation the ledger records, ``noise_ratio_upper`` falls below 1
    with probability at most ``(1 - confidence) / 2``. So a correct training is
    reported as a violation with probability at most ``1 - confidence``. If the
    mechanism is Gaussian in shape (see the module's docstring), its true epsilon is
    below ``epsilon_gaussian_fit`` with probability at most ``1 - confidence``.
    """
    import torch

    from bract import tasks
    from bract.privacy.accounting import TrainingPlan, calibrate
    from bract.privacy.training import PrivateTrainer

    start = time.perf_counter()
    task = tasks.TaskConfig.for_dataset(config.dataset, clients=1, seed=config.seed,
                                        n_samples=config.samples)
    ds = tasks.dataset_for(task)
    task = replace(task, batch_size=config.batch_size or len(ds.y_train))
    loader = tasks.loader_of(task, ds.x_train, ds.y_train)
    n = len(ds.y_train)
    if config.noise_multiplier is not None:
        sigma = float(config.noise_multiplier)
    else:
        assert config.target_epsilon is not None
        plan = TrainingPlan(1, config.epochs, n, task.batch_size)
        sigma = calibrate(config.target_epsilon, config.delta, plan).noise_multiplier
    torch.manual_seed(config.seed)
    model = tasks.build_model(task)
    trainer = PrivateTrainer(
        model, tasks.make_optimizer(task, model), loader, noise_multiplier=sigma,
        max_grad_norm=config.max_grad_norm, delta=config.delta, local_epochs=config.epochs,
        criterion=tasks.make_criterion(task), client_id="audit",
        grad_sample_mode=config.grad_sample_mode,
    )
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    canaries = _Canaries(params, config.canaries, config.max_grad_norm, sigma,
                         config.noise_scale, trainer.plan_per_round.sample_rate)
    trainer._audit_hook = canaries.hook
    outcome = trainer.train_round(1, on_step=on_step)
    if not outcome.trained or outcome.event is None:
        raise RuntimeError(f"the audited training did not run: {outcome.decision.reason}")
    # Two tests, each at half the error budget: a false alarm on a correct training
    # happens with probability at most 1 - confidence in all.
    each = 1.0 - (1.0 - config.confidence) / 2
    best, grid = audit_scores(canaries.scores, canaries.members, config.delta, each,
                              config.guess_fractions)
    ratio, upper = noise_ratio(canaries.noise_ss, canaries.noise_count,
                               sigma * config.max_grad_norm, each)
    fit = gaussian_fit(canaries.shift_sum, canaries.shift_count, upper * sigma,
                       config.max_grad_norm, each)
    eps_fit = math.nan
    if fit[1] is not None:
        from bract.privacy.accounting import DpSgdEvent, epsilon_of

        eps_fit = epsilon_of([DpSgdEvent(fit[1], outcome.event.sample_rate,
                                         outcome.event.steps, 1.0, config.delta)],
                             config.delta, trainer.accountant) if math.isfinite(fit[1]) else 0.0
    return GradientCanaryAuditReport(
        dataset=config.dataset, setting=SETTING, canaries=config.canaries,
        members=int(canaries.members.sum()), noise_multiplier=sigma,
        noise_scale=config.noise_scale, max_grad_norm=config.max_grad_norm,
        sample_rate=outcome.event.sample_rate, steps=outcome.event.steps,
        delta=config.delta, accountant=trainer.accountant, claimed_epsilon=trainer.epsilon(),
        confidence=config.confidence, epsilon_lower=best.epsilon_lower, best=best,
        seconds=time.perf_counter() - start, noise_ratio=ratio, noise_ratio_upper=upper,
        grid=grid, epsilon_gaussian_fit=eps_fit, shift_ratio=fit[0],
        noise_multiplier_fit=fit[1] if fit[1] is not None else math.nan,
    )


def gaussian_fit(shift_sum: float, count: int, noise_multiplier_upper: float, clip: float,
                 confidence: float) -> tuple[float, float | None]:
    """The members' mean shift over ``clip`` (estimate) and an effective noise
    multiplier ``s_hi / shift_lo`` (``inf`` when the shift's lower bound is not above
    0; ``None`` without observations), from ``count`` observations summing to
    ``shift_sum``, each the shift plus Gaussian noise of standard deviation at most
    ``noise_multiplier_upper * clip``. Guarantee: if that noise bound holds, the shift's
    lower bound ``mean - z * s_hi / sqrt(count)`` exceeds the true shift with
    probability at most ``1 - confidence``."""
    from scipy import stats

    if count == 0 or not math.isfinite(noise_multiplier_upper):
        return math.nan, None
    s_hi = noise_multiplier_upper * clip
    mean = shift_sum / count
    low = mean - float(stats.norm.ppf(confidence)) * s_hi / math.sqrt(count)
    if low <= 0:
        return mean / clip, math.inf
    return mean / clip, s_hi / low


def noise_ratio(sum_squares: float, count: int, claimed_std: float, confidence: float
                ) -> tuple[float, float]:
    """The noise standard deviation measured from ``count`` values with sum of squares
    ``sum_squares``, as a multiple of ``claimed_std``: the estimate, and its upper
    bound at ``confidence`` (chi-square). Assumes Gaussian noise of mean 0 (with q < 1
    the records' gradients add to it: the estimate can only be too high)."""
    from scipy import stats

    if count == 0 or claimed_std <= 0:
        return math.nan, math.inf
    estimate = math.sqrt(sum_squares / count) / claimed_std
    upper = math.sqrt(sum_squares / stats.chi2.ppf(1 - confidence, count)) / claimed_std
    return estimate, upper
