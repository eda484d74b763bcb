"""Empirical lower bound on epsilon from one training run with canaries.

The audit (Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1)
Training Run") trains ONE model with the DP-SGD configuration under audit and
tests the claim "this training is (epsilon, delta)-DP" against what the model
reveals about ``m`` canaries, each of which was put into the training set by a
secret fair coin. Statistics in :mod:`bract.audit.one_run`.

Setting, and why (the strongest we can run through bract's own trainer):

* **Canaries with a coordinate of their own.** The audited model is a linear
  classifier over the task's features plus ``m`` extra "canary features" that
  are 0 in every real record. Canary ``i`` is the input ``A * e_(d+i)`` with a
  random label, so its gradient lands on weights that no other record touches.
  This is an input-space realisation of the "Dirac" gradient canaries of the
  paper's white-box experiments, without interference between canaries, and it
  runs through the real code path: :class:`~bract.privacy.training.PrivateTrainer`
  (Opacus per-example clipping, bract's secure noise, Poisson sampling from a
  private generator, the ledger and the PRV accountant).
* **Black-box score on the final model only.** The auditor queries the initial
  and the final model: score = how much the canary's margin (logit of its label
  minus the mean of the other logits) grew, minus how much the margin of the
  all-zero input grew (that removes the shared bias). Auditing only the final
  model is valid (DP covers every intermediate model) but gives up power.
* **Same configuration as the claim.** Noise multiplier (or the one calibrated
  for the target epsilon), clip norm, Poisson sampling rate ``1/ceil(n/B)``
  (``n`` counts the included canaries) and number of steps are those the ledger
  records; the claimed epsilon is the trainer's own (PRV) figure.

What it can show: a lower bound that exceeds the claimed epsilon proves, at the
stated confidence, that the training is not as private as claimed (noise off or
too small, clipping broken, a sampling or accounting bug). What it cannot show:
that the claim is right. A bound below the claim is *consistent* with it, not a
proof of it; one-run audits of the final model are far from tight (with
``m`` canaries the bound cannot exceed roughly ``log(m)``-ish values even for a
non-private run; see :mod:`bract.audit.one_run`).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bract.audit.one_run import DEFAULT_GUESS_FRACTIONS, GuessOutcome, audit_scores

#: Datasets the audit can build canaries for (tabular classification).
AUDIT_DATASETS = ("breast-cancer",)
#: Confidence of the reported bound unless told otherwise.
DEFAULT_CONFIDENCE = 0.95
SETTING = (
    "input-space canaries with a feature of their own (Dirac-like) on a linear model; "
    "black-box margin-growth score on the final model; one run"
)


@dataclass(frozen=True)
class EmpiricalAuditConfig:
    """What to audit: a DP-SGD configuration, and how many canaries to spend on it.

    Exactly one of ``target_epsilon`` (the noise multiplier is calibrated for it,
    as ``bract simulate`` does) and ``noise_multiplier`` (0 = no noise, a
    non-private run) must be set.
    """

    dataset: str = "breast-cancer"
    canaries: int = 1000
    target_epsilon: float | None = 2.0
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.2
    canary_scale: float = 4.0
    confidence: float = DEFAULT_CONFIDENCE
    guess_fractions: tuple[float, ...] = DEFAULT_GUESS_FRACTIONS
    seed: int = 0  # the public train/test split only; coins and noise never use it
    device: str | None = "cpu"
    #: Train with this multiple of the noise the ledger records (1: correct; 0.5: the
    #: "noise halved" bug), to show what the audit does and does not catch.
    noise_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.dataset not in AUDIT_DATASETS:
            raise ValueError(
                f"the empirical audit builds canaries for tabular classification data; "
                f"dataset {self.dataset!r} is not supported (choose one of {AUDIT_DATASETS})."
            )
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "give exactly one of target_epsilon (calibrate the noise, as bract simulate "
                "does) and noise_multiplier (0 = no noise)."
            )
        if self.target_epsilon is not None and not (
            math.isfinite(self.target_epsilon) and self.target_epsilon > 0
        ):
            raise ValueError(f"target_epsilon must be a finite number > 0 "
                             f"(got {self.target_epsilon!r}).")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ValueError(f"noise_multiplier must be a finite number >= 0 "
                             f"(got {self.noise_multiplier!r}).")
        if not isinstance(self.canaries, int) or self.canaries < 10:
            raise ValueError(
                f"canaries must be an integer >= 10 (got {self.canaries!r}); the bound grows "
                "with the number of canaries, 500-2000 is typical."
            )
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r}).")
        for name in ("lr", "max_grad_norm", "canary_scale", "noise_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 (got {value!r}).")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must lie strictly between 0 and 1 (got {self.delta!r}).")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(
                f"confidence must lie strictly between 0 and 1 (got {self.confidence!r})."
            )


@dataclass(frozen=True)
class Canaries:
    """``m`` canaries: inputs (one own feature each), labels, and the secret coins."""

    inputs: np.ndarray  # [m, d + m] float32
    labels: np.ndarray  # [m] int64
    members: np.ndarray  # [m] bool: the secret coins (True = trained on)

    @property
    def m(self) -> int:
        """Number of canaries."""
        return int(self.labels.size)


def secret_bits(count: int) -> np.ndarray:
    """``count`` fair bits from the operating system's CSPRNG (:mod:`secrets`).

    Unpredictable by anyone who sees the code, the data seed or the model: the
    audit's validity rests on the coins being independent of everything else.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0 (got {count}).")
    raw = np.frombuffer(secrets.token_bytes((count + 7) // 8), dtype=np.uint8)
    return np.unpackbits(raw)[:count].astype(bool)


def make_canaries(n_features: int, m: int, n_classes: int, scale: float) -> Canaries:
    """Canary ``i`` is ``scale * e_(n_features + i)`` with a secret random label.

    Each canary is included with probability 1/2 by a secret coin
    (:func:`secret_bits`); labels come from the same source.
    """
    if n_classes != 2:
        raise ValueError(f"canaries are built for binary classification (got {n_classes} "
                         "classes).")
    x = np.zeros((m, n_features + m), dtype=np.float32)
    x[np.arange(m), n_features + np.arange(m)] = scale
    labels = secret_bits(m).astype(np.int64)
    return Canaries(x, labels, secret_bits(m))


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit of each row's label minus the mean of its other logits."""
    k = logits.shape[1]
    own = logits[np.arange(len(labels)), labels]
    return own - (logits.sum(axis=1) - own) / (k - 1)


def canary_scores(
    predict_before: Callable[[np.ndarray], np.ndarray],
    predict_after: Callable[[np.ndarray], np.ndarray],
    canaries: Canaries,
) -> np.ndarray:
    """Black-box scores: margin growth of each canary minus that of the zero input.

    ``predict_*`` map inputs ``[N, D]`` to logits ``[N, K]`` (the initial and the
    trained model). Higher score: more likely trained on.
    """
    zero = np.zeros((1, canaries.inputs.shape[1]), dtype=np.float32)

    def calibrated(predict: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        own = margins(predict(canaries.inputs), canaries.labels)
        ref = margins(np.repeat(predict(zero), canaries.m, axis=0), canaries.labels)
        return own - ref

    return calibrated(predict_after) - calibrated(predict_before)


@dataclass(frozen=True)
class EmpiricalAuditReport:
    """What one audit found, with everything needed to recompute the bound."""

    dataset: str
    setting: str
    canaries: int
    included: int
    canary_scale: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    epochs: int
    batch_size: int
    lr: float
    delta: float
    accountant: str
    claimed_epsilon: float
    confidence: float
    epsilon_lower: float
    best: GuessOutcome
    grid: list[GuessOutcome]
    test_accuracy: float
    seconds: float
    scores: list[float] = field(repr=False)
    members: list[bool] = field(repr=False)

    @property
    def verdict(self) -> str:
        """``"consistent"`` if the lower bound does not exceed the claim, else ``"VIOLATION"``."""
        return "consistent" if self.epsilon_lower <= self.claimed_epsilon else "VIOLATION"

    @property
    def private(self) -> bool:
        """Whether the run claimed any DP at all (noise multiplier > 0)."""
        return self.noise_multiplier > 0

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict (infinite epsilon as the string ``"inf"``)."""
        d = asdict(self)
        d["best"] = self.best.to_plain()
        d["grid"] = [g.to_plain() for g in self.grid]
        d["claimed_epsilon"] = (
            self.claimed_epsilon if math.isfinite(self.claimed_epsilon) else "inf"
        )
        d["verdict"] = self.verdict
        return d


def run_empirical_audit(
    config: EmpiricalAuditConfig,
    on_step: Callable[[int, int], None] | None = None,
) -> EmpiricalAuditReport:
    """Train once with canaries under ``config``'s DP-SGD and bound epsilon from below.

    Guarantee: if the training is (epsilon, delta)-DP per example as the ledger
    claims, ``epsilon_lower`` exceeds epsilon with probability at most
    ``1 - confidence`` (over the secret coins and the training's randomness).
    ``on_step(step, total)`` reports training progress.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from bract.data import load_dataset
    from bract.models.tabular import TabularMLP
    from bract.privacy.accounting import TrainingPlan, calibrate
    from bract.privacy.training import PrivateTrainer

    start = time.perf_counter()
    ds = load_dataset(config.dataset, seed=config.seed)
    d, m = int(ds.x_train.shape[1]), config.canaries
    canaries = make_canaries(d, m, ds.num_classes, config.canary_scale)
    x_real = np.zeros((ds.n_train, d + m), dtype=np.float32)
    x_real[:, :d] = ds.x_train
    x = np.concatenate([x_real, canaries.inputs[canaries.members]])
    y = np.concatenate([ds.y_train, canaries.labels[canaries.members]]).astype(np.int64)
    n = len(y)

    if config.noise_multiplier is not None:
        sigma = float(config.noise_multiplier)
    else:
        assert config.target_epsilon is not None
        plan = TrainingPlan(1, config.epochs, n, config.batch_size)
        sigma = calibrate(config.target_epsilon, config.delta, plan).noise_multiplier

    model = TabularMLP(d + m, ds.num_classes, hidden=None)
    device = torch.device(config.device or "cpu")

    def predictor(net: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
        def predict(inputs: np.ndarray) -> np.ndarray:
            net.eval()
            with torch.no_grad():
                out = net(torch.from_numpy(inputs).to(device))
            return out.detach().cpu().numpy().astype(np.float64)

        return predict

    initial = TabularMLP(d + m, ds.num_classes, hidden=None)
    initial.load_state_dict(model.state_dict())
    initial.to(device)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
                        batch_size=config.batch_size)
    trainer = PrivateTrainer(
        model, torch.optim.SGD(model.parameters(), lr=config.lr), loader,
        noise_multiplier=sigma, max_grad_norm=config.max_grad_norm, delta=config.delta,
        local_epochs=config.epochs, client_id="audit", device=device,
    )
    if config.noise_scale != 1.0:  # the optimizer adds this much; the ledger records sigma
        trainer._audit_hook = lambda opt: setattr(opt, "noise_multiplier",
                                                  sigma * config.noise_scale)
    outcome = trainer.train_round(1, on_step=on_step)
    if not outcome.trained or outcome.event is None:
        raise RuntimeError(f"the audited training did not run: {outcome.decision.reason}")
    claimed = trainer.epsilon()
    scores = canary_scores(predictor(initial), predictor(trainer.model), canaries)
    best, grid = audit_scores(scores, canaries.members, config.delta, config.confidence,
                              config.guess_fractions)
    x_test = np.zeros((ds.n_test, d + m), dtype=np.float32)
    x_test[:, :d] = ds.x_test
    accuracy = float(np.mean(predictor(trainer.model)(x_test).argmax(axis=1) == ds.y_test))
    return EmpiricalAuditReport(
        dataset=config.dataset, setting=SETTING, canaries=m,
        included=int(canaries.members.sum()), canary_scale=float(config.canary_scale),
        noise_multiplier=sigma, max_grad_norm=float(config.max_grad_norm),
        sample_rate=outcome.event.sample_rate, steps=outcome.event.steps,
        epochs=config.epochs, batch_size=config.batch_size, lr=float(config.lr),
        delta=float(config.delta), accountant=trainer.accountant, claimed_epsilon=claimed,
        confidence=float(config.confidence), epsilon_lower=best.epsilon_lower, best=best,
        grid=grid, test_accuracy=accuracy, seconds=time.perf_counter() - start,
        scores=[float(s) for s in scores], members=[bool(b) for b in canaries.members],
    )


# ------------------------------------------------------------------------- output


def _fmt_eps(value: float) -> str:
    return "∞" if not math.isfinite(value) else f"{value:.3f}"


def plot_scores(report: EmpiricalAuditReport, path: Path) -> Path:
    """Histogram of canary scores, members vs non-members, with the guess thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(report.scores)
    members = np.asarray(report.members, dtype=bool)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[members], bins=bins, alpha=0.6, label=f"members ({members.sum()})",
            color="tab:red")
    ax.hist(scores[~members], bins=bins, alpha=0.6, label=f"non-members ({(~members).sum()})",
            color="tab:blue")
    order = np.sort(scores)[::-1]
    k = report.best.k_plus
    if 0 < k <= order.size:
        ax.axvline(order[k - 1], color="tab:red", ls="--", lw=1, label=f"top {k}: guessed in")
        ax.axvline(order[-k], color="tab:blue", ls="--", lw=1,
                   label=f"bottom {report.best.k_minus}: guessed out")
    ax.set_xlabel("canary score (margin growth)")
    ax.set_ylabel("canaries")
    ax.set_title(
        f"σ={report.noise_multiplier:.3g}: claimed ε={_fmt_eps(report.claimed_epsilon)}, "
        f"lower bound {report.epsilon_lower:.3f} ({report.confidence:.0%})"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_markdown(report: EmpiricalAuditReport, plot_name: str | None = None) -> str:
    """A privacy officer's summary: verdict first, then the numbers and their meaning."""
    b = report.best
    lines = [
        "# Empirical privacy audit (one run, canaries)",
        "",
        f"**Verdict: {report.verdict}** — empirical lower bound ε ≥ "
        f"{report.epsilon_lower:.3f} at {report.confidence:.0%} confidence; claimed ε = "
        f"{_fmt_eps(report.claimed_epsilon)} at δ = {report.delta:g} ({report.accountant}).",
        "",
    ]
    if not report.private:
        lines += ["The audited run added no noise (noise multiplier 0): it claims no "
                  "differential privacy, and the bound shows how much a non-private run leaks.",
                  ""]
    lines += [
        "| quantity | value |",
        "| --- | --- |",
        f"| dataset | {report.dataset} |",
        f"| canaries m (included by secret coin) | {report.canaries} ({report.included}) |",
        f"| noise multiplier σ | {report.noise_multiplier:.4g} |",
        f"| clip norm C | {report.max_grad_norm:g} |",
        f"| sampling rate q, steps | {report.sample_rate:.4g}, {report.steps} |",
        f"| guesses (k+ in, k- out) | {b.guesses} ({b.k_plus}, {b.k_minus}) |",
        f"| correct guesses | {b.correct} ({b.correct / max(1, b.guesses):.1%}) |",
        f"| guess counts tried (Bonferroni) | {len(report.grid)}, each at significance "
        f"{b.significance:.4g} |",
        f"| test accuracy of the audited model | {report.test_accuracy:.3f} |",
        "",
        f"Setting: {report.setting}.",
        "",
        "What this can show: a lower bound above the claimed ε proves, at the stated "
        "confidence, that the training is less private than claimed. What it cannot show: "
        "that the claim holds. A bound below the claim is consistent with it, not a proof; "
        "one-run audits of the final model are far from tight.",
        "",
        "| k per side | guesses | correct | ε lower bound |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {g.k_plus} | {g.guesses} | {g.correct} | {g.epsilon_lower:.3f} |"
              for g in report.grid]
    if plot_name:
        lines += ["", f"![canary scores]({plot_name})"]
    return "\n".join(lines) + "\n"


def write_empirical_report(report: EmpiricalAuditReport, out_dir: Path) -> list[Path]:
    """Write ``empirical.json``, ``empirical.md`` and ``empirical_scores.png`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_scores(report, out_dir / "empirical_scores.png")
    js = out_dir / "empirical.json"
    js.write_text(json.dumps(report.to_plain(), indent=2) + "\n")
    md = out_dir / "empirical.md"
    md.write_text(report_markdown(report, png.name))
    return [js, md, png]
