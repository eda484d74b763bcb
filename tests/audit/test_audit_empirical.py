"""One-run empirical audit: the statistics, and the audit on real DP-SGD runs.

Reference values come from the p-value/bisection code published with Steinke,
Nasr and Jagielski (2023), "Privacy Auditing with One (1) Training Run" (run
once, outside this repository, on the arguments below); the same formula is in
google-deepmind/jax_privacy (``auditing._one_run_p_value``).
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.audit.empirical import (
    EmpiricalAuditConfig,
    canary_scores,
    make_canaries,
    run_empirical_audit,
    secret_bits,
    write_empirical_report,
)
from bract.audit.one_run import (
    audit_scores,
    epsilon_lower_bound,
    guess_counts,
    make_guesses,
    p_value,
)
from bract.cli import main

# (m, guesses, correct, delta, 1 - confidence) -> epsilon lower bound of the paper's code
REFERENCE_BOUNDS = [
    ((1000, 100, 100, 1e-5, 0.05), 3.4653763473033905),
    ((1000, 1000, 1000, 1e-5, 0.05), 5.782283132895827),
    ((1000, 500, 400, 1e-5, 0.05), 1.1979686450213194),
    ((200, 100, 70, 0.0, 0.05), 0.4716718615964055),
    ((1000, 200, 150, 1e-5, 0.01), 0.7112964922562242),
    ((100, 100, 60, 1e-5, 0.05), 0.051679679192602634),
    ((10000, 1000, 900, 1e-6, 0.05), 2.0206455951556563),
    ((500, 500, 250, 1e-5, 0.05), 0.0),
]
# (m, guesses, correct, epsilon, delta) -> p-value of the paper's code
REFERENCE_P = [
    ((1000, 100, 90, 1.0, 1e-5), 0.0008412885614385305),
    ((1000, 100, 90, 2.0, 1e-5), 0.3449868367938024),
    ((200, 50, 40, 0.5, 0.0), 0.005629515062134206),
    ((5000, 2000, 1300, 0.5, 1e-6), 0.005838849275024193),
    ((100, 100, 100, 3.0, 1e-3), 0.034270048720502516),
]


# ----------------------------------------------------------------------- statistics


@pytest.mark.parametrize(("args", "expected"), REFERENCE_P)
def test_p_value_matches_reference_code(args, expected) -> None:
    assert p_value(*args) == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("args", "expected"), REFERENCE_BOUNDS)
def test_lower_bound_matches_reference_code(args, expected) -> None:
    m, r, v, delta, significance = args
    # the reference bisects 30 times from [0, 1 + k]: agreement to ~1e-8
    assert epsilon_lower_bound(m, r, v, delta, 1 - significance) == pytest.approx(
        expected, abs=1e-7)


@pytest.mark.parametrize("r", [1, 10, 100, 1000])
def test_perfect_guessing_with_delta_zero_has_a_closed_form(r: int) -> None:
    # P[Binomial(r, q) >= r] = q^r = 0.05  =>  q = 0.05^(1/r), eps = log(q / (1 - q))
    # (clamped at 0: one right guess in one is what chance gives half the time)
    q = 0.05 ** (1 / r)
    expected = max(0.0, math.log(q / (1 - q)))
    assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(expected, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(2, 3000), data=st.data())
def test_bound_is_zero_at_chance(m: int, data) -> None:
    r = data.draw(st.integers(1, m))
    v = data.draw(st.integers(0, r // 2))
    assert epsilon_lower_bound(m, r, v, 1e-5) == 0.0


@settings(max_examples=40, deadline=None)
@given(m=st.integers(10, 3000), data=st.data())
def test_bound_is_monotone_in_correct_guesses(m: int, data) -> None:
    r = data.draw(st.integers(1, m))
    v = data.draw(st.integers(0, r - 1))
    delta = data.draw(st.sampled_from([0.0, 1e-6, 1e-5]))
    lo, hi = epsilon_lower_bound(m, r, v, delta), epsilon_lower_bound(m, r, v + 1, delta)
    assert hi >= lo - 1e-9
    assert p_value(m, r, v + 1, 1.0, delta) <= p_value(m, r, v, 1.0, delta) + 1e-12


@settings(max_examples=40, deadline=None)
@given(m=st.integers(10, 3000), data=st.data())
def test_more_delta_or_confidence_never_raises_the_bound(m: int, data) -> None:
    r = data.draw(st.integers(1, m))
    v = data.draw(st.integers(r // 2, r))
    base = epsilon_lower_bound(m, r, v, 1e-6, 0.95)
    assert epsilon_lower_bound(m, r, v, 1e-4, 0.95) <= base + 1e-9
    assert epsilon_lower_bound(m, r, v, 1e-6, 0.99) <= base + 1e-9
    # p-value increases with the epsilon under test (the bisection relies on it)
    ps = [p_value(m, r, v, e, 1e-6) for e in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(ps))


def test_bound_is_valid_on_randomized_response() -> None:
    # Randomized response on each canary's coin is exactly eps0-DP per canary, and the
    # strongest possible attack: the bound must exceed eps0 at most ~5% of the time
    # (and is conservative because of the Bonferroni share), yet not be vacuous.
    eps0, m, trials = 1.0, 1000, 60
    rng = np.random.default_rng(3)  # simulated mechanism, not a secret
    bounds = []
    for _ in range(trials):
        coins = rng.random(m) < 0.5
        keep = rng.random(m) < math.exp(eps0) / (1 + math.exp(eps0))
        out = np.where(keep, coins, ~coins).astype(float)
        best, _grid = audit_scores(out, coins, delta=0.0)
        bounds.append(best.epsilon_lower)
    bounds = np.array(bounds)
    assert np.mean(bounds > eps0) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert np.median(bounds) > 0.5 * eps0  # the audit has power against the worst case


def test_guesses_and_grid() -> None:
    scores = np.array([0.5, 3.0, -1.0, 2.0, 0.0, 2.0])
    g = make_guesses(scores, 2, 1)
    assert g.tolist() == [0, 1, -1, 1, 0, 0]  # ties broken by index: node 3 before 5
    assert make_guesses(scores, 0, 0).tolist() == [0] * 6
    with pytest.raises(ValueError, match="sum to at most"):
        make_guesses(scores, 4, 3)
    assert guess_counts(1000) == [25, 50, 100, 200, 300, 400, 500]
    with pytest.raises(ValueError, match="at least 2 canaries"):
        guess_counts(1)
    best, grid = audit_scores([3.0, 2.0, 1.0, 0.0], [True, True, False, False], 1e-5)
    assert [o.correct for o in grid] == [o.guesses for o in grid]
    assert best.significance == pytest.approx(0.05 / len(grid))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: epsilon_lower_bound(10, 5, 6, 1e-5), "correct <= guesses <= m"),
        (lambda: epsilon_lower_bound(10, 11, 5, 1e-5), "correct <= guesses <= m"),
        (lambda: epsilon_lower_bound(10, 5, 4, 1.5), "delta"),
        (lambda: epsilon_lower_bound(10, 5, 4, 1e-5, 1.0), "confidence"),
        (lambda: p_value(10, 5, 4, -1.0, 1e-5), "epsilon"),
        (lambda: audit_scores([1.0, float("nan")], [True, False], 1e-5), "finite"),
        (lambda: audit_scores([1.0, 2.0], [True], 1e-5), "same length"),
    ],
)
def test_bad_statistics_input_is_named(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------- canaries


def test_coins_and_canaries() -> None:
    bits = secret_bits(4000)
    assert bits.dtype == bool and bits.size == 4000
    assert abs(bits.mean() - 0.5) < 0.05  # fair (6 sigma is 0.047)
    assert not np.array_equal(secret_bits(128), secret_bits(128))  # fresh each call
    c = make_canaries(30, 50, 2, 4.0)
    assert c.inputs.shape == (50, 80)
    # each canary has one non-zero coordinate, its own, outside the real features
    nz = np.nonzero(c.inputs)
    assert nz[0].tolist() == list(range(50)) and nz[1].tolist() == list(range(30, 80))
    assert set(np.unique(c.labels)) <= {0, 1}


def test_scores_isolate_the_canary_coordinate() -> None:
    c = make_canaries(3, 4, 2, 2.0)
    before = torch.nn.Linear(7, 2)
    after = torch.nn.Linear(7, 2)
    after.load_state_dict(before.state_dict())
    with torch.no_grad():
        after.bias += torch.tensor([5.0, -5.0])  # shared shift: must not change scores
        after.weight[c.labels[2], 3 + 2] += 1.0  # only canary 2 learnt its label

    def predictor(net):
        return lambda x: net(torch.from_numpy(x)).detach().numpy().astype(np.float64)

    s = canary_scores(predictor(before), predictor(after), c)
    # margin = own logit - other logit: canary 2 gains scale * 1.0; the rest gain nothing
    assert s[2] == pytest.approx(2.0, abs=1e-5)
    assert np.allclose(np.delete(s, 2), 0.0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "synthetic"}, "not supported"),
        ({"target_epsilon": 2.0, "noise_multiplier": 1.0}, "exactly one"),
        ({"target_epsilon": None}, "exactly one"),
        ({"canaries": 5}, "canaries"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": None, "noise_multiplier": -0.5}, "noise_multiplier"),
        ({"confidence": 1.5}, "confidence"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_bad_config_is_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EmpiricalAuditConfig(**kwargs)


# ------------------------------------------------------------------- real runs

M = 500  # canaries: a noise-free run can reach ~4.3 at 95% with the Bonferroni grid


@pytest.fixture(scope="module")
def dp_run():
    return run_empirical_audit(EmpiricalAuditConfig(canaries=M, target_epsilon=2.0))


@pytest.fixture(scope="module")
def noise_off_run():
    return run_empirical_audit(
        EmpiricalAuditConfig(canaries=M, target_epsilon=None, noise_multiplier=0.0))


def test_dp_run_is_consistent_with_its_claim(dp_run) -> None:
    assert dp_run.claimed_epsilon == pytest.approx(2.0, rel=0.01)  # the ledger's PRV figure
    assert dp_run.noise_multiplier > 0.5
    assert 0 <= dp_run.epsilon_lower <= dp_run.claimed_epsilon
    assert dp_run.verdict == "consistent"
    assert dp_run.included == sum(dp_run.members)
    assert dp_run.steps == 10 * round(1 / dp_run.sample_rate)  # 10 epochs of Poisson batches
    assert dp_run.test_accuracy > 0.85  # the audited model still learns the real task


def test_noise_off_yields_a_high_lower_bound(noise_off_run, dp_run) -> None:
    # Without noise every trained canary moves and no other one does: near-perfect
    # guesses. Threshold: > 3.5 at 95% (m = 500), and 2 above the DP run's bound.
    assert noise_off_run.claimed_epsilon == math.inf
    assert noise_off_run.epsilon_lower > 3.5
    assert noise_off_run.epsilon_lower > dp_run.epsilon_lower + 2.0
    b = noise_off_run.best
    assert b.correct >= 0.98 * b.guesses


class _ZeroNoise:
    """A broken noise source: the ledger still records sigma, but nothing is added."""

    def add_noise_(self, target: torch.Tensor, std: float) -> torch.Tensor:
        return target

    def add_noise_each_(self, targets: list[torch.Tensor], std: float) -> None:
        return None

    def normal_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        return torch.zeros_like(reference)

    def fill_standard_normal_(self, out: torch.Tensor) -> torch.Tensor:
        # What the noise drawn a step ahead (NoisePrefetcher) reads, on when torch
        # leaves a core free.
        return out.zero_()


def test_broken_noise_is_caught_as_a_violation(monkeypatch) -> None:
    # The bug the audit exists for: the configuration claims epsilon 2, but the noise
    # never reaches the gradients. The ledger cannot see it; the canaries can.
    monkeypatch.setattr("bract.privacy.training.SecureGaussian", _ZeroNoise)
    report = run_empirical_audit(EmpiricalAuditConfig(canaries=M, target_epsilon=2.0))
    assert report.claimed_epsilon == pytest.approx(2.0, rel=0.01)
    assert report.epsilon_lower > 3.5
    assert report.verdict == "VIOLATION"


def test_report_files(dp_run, tmp_path) -> None:
    paths = write_empirical_report(dp_run, tmp_path)
    assert [p.name for p in paths] == ["empirical.json", "empirical.md", "empirical_scores.png"]
    data = json.loads((tmp_path / "empirical.json").read_text())
    assert data["verdict"] == "consistent"
    assert len(data["scores"]) == len(data["members"]) == M
    # an auditor can recompute the bound from the file alone
    best, _ = audit_scores(data["scores"], data["members"], data["delta"], data["confidence"])
    assert best.epsilon_lower == pytest.approx(data["epsilon_lower"])
    md = (tmp_path / "empirical.md").read_text()
    assert md.splitlines()[2].startswith("**Verdict: consistent**")
    assert "cannot show" in md
    png = (tmp_path / "empirical_scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_noise_off_report_says_non_private(noise_off_run, tmp_path) -> None:
    write_empirical_report(noise_off_run, tmp_path)
    data = json.loads((tmp_path / "empirical.json").read_text())
    assert data["claimed_epsilon"] == "inf"
    assert "no noise" in (tmp_path / "empirical.md").read_text()


def test_cli_runs_the_audit(tmp_path, capsys) -> None:
    out = tmp_path / "emp"
    rc = main(["audit", "empirical", "--noise-multiplier", "0", "--canaries", "100",
               "--epochs", "3", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0  # a non-private run claims nothing, so nothing is violated
    assert "NON-PRIVATE" in text and "verdict" in text
    assert {p.name for p in out.iterdir()} == {"empirical.json", "empirical.md",
                                                 "empirical_scores.png"}


def test_cli_exits_1_on_a_violation(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("bract.privacy.training.SecureGaussian", _ZeroNoise)
    rc = main(["audit", "empirical", "--target-epsilon", "1", "--canaries", "300",
               "--out", str(tmp_path)])
    assert rc == 1
    assert "VIOLATION" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--canaries", "5"], "canaries"),
        (["--dataset", "diabetes"], "not supported"),
        (["--confidence", "2"], "confidence"),
    ],
)
def test_cli_bad_input_exits_2(argv, match, tmp_path, capsys) -> None:
    rc = main(["audit", "empirical", *argv, "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 2
    assert "error:" in text and match in text

