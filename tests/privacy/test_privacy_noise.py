"""SecureGaussian: a correct N(0, 1) from AES-CTR, and the DP optimizer really uses it.

Statistical bounds are 6 standard errors of each estimator (false-alarm rate
~2e-9 per check), so the tests are not flaky yet catch any wrong scale, shift or
shape of the distribution by more than about half a percent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from scipy import stats
from torch import nn

from bract.privacy import SecureGaussian, use_secure_noise
from bract.privacy.noise import BLOCK

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

N = 1_000_000
SIX = 6.0


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return SecureGaussian().standard_normal(N)


def test_shape_dtype_and_finiteness(samples: np.ndarray) -> None:
    assert samples.shape == (N,) and samples.dtype == np.float64
    assert np.isfinite(samples).all()
    gen = SecureGaussian()
    assert gen.standard_normal(0).shape == (0,)
    assert gen.standard_normal(7).shape == (7,)  # odd counts (Box-Muller makes pairs)
    with pytest.raises(ValueError, match="count"):
        gen.standard_normal(-1)


def test_mean_and_variance_are_standard(samples: np.ndarray) -> None:
    # SE(mean) = 1/sqrt(N); SE(sample variance) = sqrt(2/N) for a standard normal.
    assert abs(samples.mean()) < SIX / math.sqrt(N)
    assert abs(samples.var(ddof=1) - 1.0) < SIX * math.sqrt(2.0 / N)


def test_third_and_fourth_moments_are_gaussian(samples: np.ndarray) -> None:
    # SE(skewness) ~ sqrt(6/N), SE(excess kurtosis) ~ sqrt(24/N).
    assert abs(stats.skew(samples)) < SIX * math.sqrt(6.0 / N)
    assert abs(stats.kurtosis(samples)) < SIX * math.sqrt(24.0 / N)


def test_kolmogorov_smirnov_against_standard_normal(samples: np.ndarray) -> None:
    # Fixed alpha = 1e-4: a correct sampler fails once in 10,000 runs.
    assert stats.kstest(samples, "norm").pvalue > 1e-4
    # ...and the test has power: a 2% scale error is rejected outright (at this N a 1%
    # one is rejected only about 97% of the time, too weak for a check that must not
    # flake).
    assert stats.kstest(samples * 1.02, "norm").pvalue < 1e-4


def test_tails_have_gaussian_mass(samples: np.ndarray) -> None:
    p = 2 * stats.norm.sf(3.0)  # P(|Z| > 3) ~ 0.0027
    observed = np.mean(np.abs(samples) > 3.0)
    assert abs(observed - p) < SIX * math.sqrt(p * (1 - p) / N)


def test_no_correlation_between_neighbours_or_box_muller_pairs(samples: np.ndarray) -> None:
    half = N // 2
    bound = SIX / math.sqrt(half)
    assert abs(np.corrcoef(samples[:-1], samples[1:])[0, 1]) < bound
    # The two outputs of one Box-Muller pair sit half a block apart.
    assert abs(np.corrcoef(samples[:half], samples[half:])[0, 1]) < bound


def test_instances_and_successive_calls_give_different_streams() -> None:
    a, b = SecureGaussian(), SecureGaussian()
    first_a, first_b = a.standard_normal(1000), b.standard_normal(1000)
    assert not np.any(first_a == first_b)
    assert not np.any(first_a == a.standard_normal(1000))


def test_normal_like_matches_reference_and_scales() -> None:
    gen = SecureGaussian()
    ref = torch.empty(400, 500, dtype=torch.float32)
    noise = gen.normal_like(ref, 3.0)
    assert noise.shape == ref.shape and noise.dtype == torch.float32
    n = ref.numel()
    assert abs(float(noise.mean())) < SIX * 3.0 / math.sqrt(n)
    assert abs(float(noise.std()) / 3.0 - 1.0) < SIX * math.sqrt(1.0 / (2 * n))
    assert gen.normal_like(torch.empty(3, dtype=torch.float64), 1.0).dtype == torch.float64
    assert torch.equal(gen.normal_like(ref, 0.0), torch.zeros_like(ref))


def _twin_generators(monkeypatch) -> tuple[SecureGaussian, SecureGaussian]:
    """Two generators keyed alike (a test-only fixed key), so their streams coincide."""
    monkeypatch.setattr("bract.privacy.noise.os.urandom", lambda n: bytes(range(n)))
    return SecureGaussian(), SecureGaussian()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 2, 3, 16, 4608, BLOCK - 1, BLOCK, BLOCK + 3]),
                      min_size=1, max_size=5),
       std=st.sampled_from([0.5, 1.0, 3.0]), data=st.data())
def test_noise_for_several_tensors_is_the_stream_split_in_order(sizes, std, data) -> None:
    # Property: add_noise_each_ gives every entry of every tensor its own sample, and
    # the samples are exactly the generator's next ones in order (no entry skipped,
    # none shared, nothing reused across tensor or block boundaries); each entry
    # becomes target + std * z evaluated in float64, rounded once to its dtype.
    with pytest.MonkeyPatch.context() as monkeypatch:
        joint, reference = _twin_generators(monkeypatch)
    dtypes = data.draw(st.lists(st.sampled_from([torch.float32, torch.float64]),
                                min_size=len(sizes), max_size=len(sizes)))
    targets = [torch.linspace(-2.0, 7.0, n, dtype=d) for n, d in zip(sizes, dtypes, strict=True)]
    before = [t.to(torch.float64, copy=True) for t in targets]
    joint.add_noise_each_(targets, std)
    z = reference.standard_normal_tensor(sum(sizes)).split(sizes)
    for t, b, zi in zip(targets, before, z, strict=True):
        # t + std * z by torch's float64 kernel, then rounded once to t's dtype
        expected = b.add_(zi, alpha=std).to(t.dtype)
        torch.testing.assert_close(t, expected, rtol=0, atol=0)
    # ...and both streams continue in step: no sample was drawn beyond the total.
    torch.testing.assert_close(joint.standard_normal_tensor(5),
                               reference.standard_normal_tensor(5), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.sampled_from([1, 3, 4608, BLOCK - 1, BLOCK, BLOCK + 3, 2 * BLOCK + 1,
                                       3 * BLOCK + 6]), min_size=1, max_size=4),
       threads=st.integers(2, 4), calls=st.integers(1, 3), data=st.data())
def test_noise_on_several_threads_is_the_one_thread_stream_bit_for_bit(sizes, threads, calls,
                                                                      data) -> None:
    # Property: with threads > 1 the blocks of a call are made in runs, each by its own
    # encryptor started at the counter of its first block; every entry of every tensor
    # (any floating dtype, across tensor and block boundaries, odd totals) gets exactly
    # the sample the one-thread stream gives it, rounded once, call after call, and the
    # stream goes on where one thread's would: no word is skipped or drawn twice.
    with pytest.MonkeyPatch.context() as monkeypatch:
        joint, reference = _twin_generators(monkeypatch)
    joint.threads = threads
    try:
        for _ in range(calls):
            dtypes = data.draw(st.lists(st.sampled_from(
                [torch.float16, torch.bfloat16, torch.float32, torch.float64]),
                min_size=len(sizes), max_size=len(sizes)))
            # (torch's float16 linspace gives NaNs at this length: made in float64.)
            targets = [torch.linspace(-2.0, 7.0, n, dtype=torch.float64).to(d)
                       for n, d in zip(sizes, dtypes, strict=True)]
            before = [t.to(torch.float64, copy=True) for t in targets]
            joint.add_noise_each_(targets, 1.5)
            z = reference.standard_normal_tensor(sum(sizes)).split(sizes)
            for t, b, zi in zip(targets, before, z, strict=True):
                torch.testing.assert_close(t, b.add_(zi, alpha=1.5).to(t.dtype), rtol=0, atol=0)
        torch.testing.assert_close(joint.standard_normal_tensor(5),
                                   reference.standard_normal_tensor(5), rtol=0, atol=0)
    finally:
        joint.close()


def test_a_run_that_fails_on_another_thread_fails_the_call_and_no_word_is_drawn_twice(
        monkeypatch) -> None:
    """A run that fails on a helper thread fails the call with its error, after every
    run ended; the stream then goes on past every word the call could have drawn (the
    samples one thread's call would have used are never handed out again), and close()
    leaves no thread."""
    import threading

    joint, reference = _twin_generators(monkeypatch)
    joint.threads = 2
    blocks = SecureGaussian._blocks

    def failing(self, count):
        if threading.current_thread().name.startswith("bract-noise-lane"):
            raise RuntimeError("a run that fails")
        return blocks(self, count)

    monkeypatch.setattr(SecureGaussian, "_blocks", failing)
    with pytest.raises(RuntimeError, match="a run that fails"):
        joint.add_noise_each_([torch.zeros(2 * BLOCK + 1)], 1.0)
    monkeypatch.setattr(SecureGaussian, "_blocks", blocks)
    reference.standard_normal_tensor(2 * BLOCK + 1)  # what the failed call was to use
    torch.testing.assert_close(joint.standard_normal_tensor(9),
                               reference.standard_normal_tensor(9), rtol=0, atol=0)
    joint.close()
    assert not any(t.name.startswith("bract-noise-lane") for t in threading.enumerate())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            joint.threads = bad


def test_noise_for_several_tensors_covers_other_layouts_and_keeps_the_values() -> None:
    gen = SecureGaussian()
    base = torch.arange(12.0).reshape(3, 4)
    strided = base.clone().t()  # not contiguous: noise added through a fresh tensor
    half = torch.zeros(1000, dtype=torch.float16)  # not float32/64: the same way
    flat32 = torch.full((5000,), 7.0)
    gen.add_noise_each_([strided, half, flat32, torch.empty(0)], 2.0)
    for noisy, clean in ((strided, base.t()), (flat32, torch.full((5000,), 7.0))):
        assert noisy.shape == clean.shape and not torch.any(noisy == clean)
    assert abs(float((flat32 - 7.0).std()) / 2.0 - 1.0) < SIX * math.sqrt(1.0 / (2 * 5000))
    assert half.dtype == torch.float16 and bool(torch.all(half != 0))
    before = flat32.clone()
    gen.add_noise_each_([flat32], 0.0)
    assert torch.equal(flat32, before)


@settings(max_examples=20, deadline=None)
@given(counts=st.lists(st.sampled_from([0, 1, 2, 7, BLOCK - 1, BLOCK, BLOCK + 3, 2 * BLOCK,
                                        2 * BLOCK + 1, 5 * BLOCK + 4]), min_size=1, max_size=3))
def test_samples_made_for_another_device_are_the_stream_itself(counts) -> None:
    # Property: for a tensor on another device (a GPU) the keystream is made here and
    # Box-Muller runs there on the same words, in the same blocks and pairs, chunk by
    # chunk. Run on the CPU, that path gives exactly the CPU path's samples, across
    # block and chunk boundaries (chunks of 2 blocks here), and consumes exactly as
    # much of the stream: the two generators stay in step.
    with pytest.MonkeyPatch.context() as monkeypatch:
        device_made, reference = _twin_generators(monkeypatch)
        monkeypatch.setattr("bract.privacy.noise.DEVICE_CHUNK_BLOCKS", 2)
        for n in counts:
            on_device = device_made.standard_normal_on(n, "cpu")
            assert on_device.dtype == torch.float64 and on_device.shape == (n,)
            torch.testing.assert_close(on_device, reference.standard_normal_tensor(n),
                                       rtol=0, atol=0)
    torch.testing.assert_close(device_made.standard_normal_tensor(5),
                               reference.standard_normal_tensor(5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="count"):
        device_made.standard_normal_on(-1, "cpu")


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.sampled_from([(1,), (3, 4), (16, 9), (200, 30)]), min_size=1,
                       max_size=4),
       data=st.data(), std=st.sampled_from([0.5, 3.0]))
def test_every_layout_and_dtype_gets_the_stream_rounded_once(shapes, data, std) -> None:
    # Property: whatever a tensor's layout (transposed, so not contiguous) or floating
    # dtype (float16, bfloat16, float32, float64), each entry becomes target + std * z
    # evaluated in float64 and rounded once to its dtype, with z the stream's next
    # samples in the order of the tensors (and, within one, of its entries).
    with pytest.MonkeyPatch.context() as monkeypatch:
        joint, reference = _twin_generators(monkeypatch)
    dtypes = data.draw(st.lists(st.sampled_from([torch.float16, torch.bfloat16, torch.float32,
                                                 torch.float64]),
                                min_size=len(shapes), max_size=len(shapes)))
    transposed = data.draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
    targets = []
    for shape, dtype, t in zip(shapes, dtypes, transposed, strict=True):
        base = torch.linspace(-2.0, 7.0, math.prod(shape), dtype=dtype).reshape(shape)
        targets.append(base.t() if t and len(shape) == 2 else base)
    before = [t.to(torch.float64, copy=True) for t in targets]
    joint.add_noise_each_(targets, std)
    samples = reference.standard_normal_tensor(sum(t.numel() for t in targets))
    for target, b, z in zip(targets, before, samples.split([t.numel() for t in targets]),
                            strict=True):
        torch.testing.assert_close(target, b.add_(z.view(target.shape), alpha=std)
                                   .to(target.dtype), rtol=0, atol=0)
    torch.testing.assert_close(joint.standard_normal_tensor(5),
                               reference.standard_normal_tensor(5), rtol=0, atol=0)


def test_tensors_on_another_device_take_the_stream_after_the_cpus() -> None:
    # The CPU's tensors take the next samples (in order), then each other device's;
    # tensors on a device other than the CPU (``meta`` here: shapes without values, so
    # only what the device path draws can be checked) consume exactly their entries'
    # samples. A tensor that is not floating-point is refused, naming its dtype.
    with pytest.MonkeyPatch.context() as monkeypatch:
        joint, reference = _twin_generators(monkeypatch)
    cpu_first = torch.zeros(10, dtype=torch.float64)
    elsewhere = [torch.zeros(BLOCK + 3, device="meta"), torch.zeros(2, 3, device="meta").t()]
    cpu_second = torch.zeros(7, dtype=torch.float64)
    joint.add_noise_each_([elsewhere[0], cpu_first, elsewhere[1], cpu_second], 1.0)
    cpu_samples = reference.standard_normal_tensor(17)
    torch.testing.assert_close(torch.cat([cpu_first, cpu_second]), cpu_samples, rtol=0, atol=0)
    reference.standard_normal_tensor(BLOCK + 3 + 6)  # what the other device took
    torch.testing.assert_close(joint.standard_normal_tensor(5),
                               reference.standard_normal_tensor(5), rtol=0, atol=0)
    assert all(t.device.type == "meta" for t in elsewhere)
    noise = joint.normal_like(torch.zeros(4, 5, device="meta", dtype=torch.bfloat16), 2.0)
    assert noise.device.type == "meta" and noise.dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"floating-point tensors, got torch\.int64"):
        joint.add_noise_each_([torch.zeros(3, dtype=torch.int64)], 1.0)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.sampled_from([1, 3, 16, 4608, BLOCK + 3]), min_size=1, max_size=4),
       steps=st.integers(1, 4), std=st.sampled_from([0.5, 2.0]))
def test_prefetched_noise_is_the_same_stream_each_sample_used_once(sizes, steps, std) -> None:
    # Property: drawing each step's noise one step ahead (in a background thread)
    # changes only when samples are drawn: step k gets exactly the generator's
    # samples [k*total, (k+1)*total), none skipped, none reused; and each float32
    # entry becomes target + std * z evaluated in float64, rounded once.
    from bract.privacy.noise import NoisePrefetcher

    with pytest.MonkeyPatch.context() as monkeypatch:
        joint, reference = _twin_generators(monkeypatch)
    prefetcher = NoisePrefetcher(joint)
    total = sum(sizes)
    for k in range(steps):
        targets = [torch.linspace(-3.0, 5.0 + k, n, dtype=torch.float32) for n in sizes]
        before = torch.cat(targets).double()
        prefetcher.add_noise_each_(targets, std)
        expected = before.add_(reference.standard_normal_tensor(total), alpha=std).float()
        torch.testing.assert_close(torch.cat(targets), expected, rtol=0, atol=0)
    prefetcher.close()
    # A change of size discards the draw made ahead (never reused): the next noise is
    # the stream after it.
    reference.standard_normal_tensor(total)
    other = [torch.zeros(total + 1, dtype=torch.float64)]
    prefetcher.add_noise_each_(other, 1.0)
    torch.testing.assert_close(other[0], reference.standard_normal_tensor(total + 1), rtol=0,
                               atol=0)
    prefetcher.close()


def test_a_prefetcher_hands_tensors_it_cannot_noise_in_place_to_its_source() -> None:
    # A transposed (not contiguous) or half-precision gradient is noised by the source
    # itself, rounded once from float64, with the stream's next samples, and no thread is
    # left; a draw made ahead before it is still used at most once (by the next step).
    from bract.privacy.noise import NoisePrefetcher

    with pytest.MonkeyPatch.context() as monkeypatch:
        joint, reference = _twin_generators(monkeypatch)
    prefetcher = NoisePrefetcher(joint)
    first = torch.zeros(5, dtype=torch.float64)
    prefetcher.add_noise_each_([first], 1.0)  # and draws the next 5 ahead
    torch.testing.assert_close(first, reference.standard_normal_tensor(5), rtol=0, atol=0)
    ahead = reference.standard_normal_tensor(5)
    strided = torch.arange(12.0, dtype=torch.float64).reshape(3, 4).t()
    half = torch.linspace(-1.0, 1.0, 7, dtype=torch.float16)
    before = [strided.clone(), half.to(torch.float64)]
    prefetcher.add_noise_each_([strided, half], 2.0)
    z = reference.standard_normal_tensor(12 + 7)
    torch.testing.assert_close(strided, before[0].add_(z[:12].view(4, 3), alpha=2.0),
                               rtol=0, atol=0)
    torch.testing.assert_close(half, before[1].add_(z[12:], alpha=2.0).half(), rtol=0, atol=0)
    assert prefetcher._worker is None
    after = torch.zeros(5, dtype=torch.float64)
    prefetcher.add_noise_each_([after], 1.0)
    torch.testing.assert_close(after, ahead, rtol=0, atol=0)
    prefetcher.close()


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.sampled_from([1, 16, 4608]), min_size=1, max_size=3),
       steps=st.integers(1, 4))
def test_a_prefetcher_told_the_steps_draws_nothing_beyond_them(sizes, steps) -> None:
    # Property: with the number of steps known, the stream is the same, no sample is
    # drawn for a step that does not happen, and no thread is left after the last.
    from bract.privacy.noise import NoisePrefetcher

    with pytest.MonkeyPatch.context() as monkeypatch:
        joint, reference = _twin_generators(monkeypatch)
    prefetcher = NoisePrefetcher(joint, remaining=steps)
    total = sum(sizes)
    for _ in range(steps):
        targets = [torch.zeros(n, dtype=torch.float64) for n in sizes]
        prefetcher.add_noise_each_(targets, 1.0)
        torch.testing.assert_close(torch.cat(targets), reference.standard_normal_tensor(total),
                                   rtol=0, atol=0)
    assert prefetcher._worker is None
    # The source stands exactly after the last step's samples.
    torch.testing.assert_close(joint.standard_normal_tensor(5),
                               reference.standard_normal_tensor(5), rtol=0, atol=0)


def _break_block(source: SecureGaussian, call: int) -> None:
    """Make ``source``'s ``call``-th block (1-based) fail part-way through a draw."""
    real_block, calls = source._block, {"n": 0}

    def flaky_block(count):
        calls["n"] += 1
        if calls["n"] == call:
            raise MemoryError("simulated")
        return real_block(count)

    source._block = flaky_block


@settings(max_examples=10, deadline=None)
@given(fail_at=st.integers(1, 3), size=st.sampled_from([3, 4608, BLOCK + 3]))
def test_a_failed_background_draw_is_reported_and_none_of_its_samples_is_used(
        fail_at, size) -> None:
    # Property: when the draw made ahead fails (here: the source raises part-way
    # through a block), the step that needed it raises an error that says so, adds
    # nothing, and no sample already handed out is handed out again; close() then
    # leaves no thread, and the samples that follow come from the stream afresh.
    from bract.privacy.noise import NoisePrefetcher

    with pytest.MonkeyPatch.context() as monkeypatch:
        joint, reference = _twin_generators(monkeypatch)
    _break_block(joint, fail_at + 1)  # the draw for step fail_at + 1 breaks
    prefetcher = NoisePrefetcher(joint)
    used = []
    for _ in range(fail_at):
        target = torch.zeros(min(size, BLOCK), dtype=torch.float64)
        prefetcher.add_noise_each_([target], 1.0)
        used.append(target.clone())
    target = torch.zeros(min(size, BLOCK), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="drawing the next step's DP noise failed"):
        prefetcher.add_noise_each_([target], 1.0)
    assert not target.any()  # nothing was added
    prefetcher.close()
    assert prefetcher._worker is None and prefetcher._ready is None
    prefetcher.add_noise_each_([target], 1.0)  # drawn afresh, in the foreground
    prefetcher.close()
    for earlier in used:
        assert not bool((target == earlier).any())
    for earlier in used:  # the steps before the failure had the stream, in order
        torch.testing.assert_close(earlier, reference.standard_normal_tensor(len(target)),
                                   rtol=0, atol=0)


def test_the_prefetcher_draws_in_one_thread_for_all_its_steps() -> None:
    # Drawing ahead starts one background thread for the whole round (not one per
    # step), and told the number of steps it ends that thread after the last one.
    import threading

    from bract.privacy.noise import NoisePrefetcher

    prefetcher = NoisePrefetcher(SecureGaussian(), remaining=6)
    before = threading.active_count()
    workers = set()
    for step in range(6):
        prefetcher.add_noise_each_([torch.zeros(100)], 1.0)
        if step < 5:
            workers.add(prefetcher._worker)
            assert threading.active_count() == before + 1
    assert len(workers) == 1 and None not in workers
    assert prefetcher._worker is None and threading.active_count() == before


def test_a_script_that_trains_with_prefetched_noise_exits_cleanly(tmp_path) -> None:
    """A draw left running at interpreter exit aborted the process (SIGABRT,
    "terminate called without an active exception"); the trainer now stops the
    prefetcher with the round."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import torch, warnings\n"
        "from torch import nn\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from bract.privacy import PrivateTrainer\n"
        "warnings.simplefilter('ignore')\n"
        "torch.manual_seed(0)\n"
        # 4M parameters: a draw ahead takes long enough to be running at exit.
        "data = TensorDataset(torch.randn(64, 2000), torch.randint(0, 2, (64,)))\n"
        "model = nn.Sequential(nn.Linear(2000, 2000), nn.ReLU(), nn.Linear(2000, 2))\n"
        "trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),\n"
        "    DataLoader(data, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0,\n"
        "    delta=1e-5, accountant='rdp', grad_sample_mode='bk', noise_prefetch=True)\n"
        "assert trainer.train_round(1).trained\n"
        "print('trained')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained" in done.stdout and "terminate called" not in done.stderr


def test_a_round_whose_noise_draw_fails_says_so_and_records_the_steps_it_took() -> None:
    """A background draw that fails mid-round ends the round with an error naming it;
    the ledger records the steps that reached the optimizer (step 1, which moved the
    model, and step 2, which failed inside it: counted, conservatively) and no thread is
    left."""
    import threading
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from bract.privacy import PrivateTrainer

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 6), torch.randint(0, 2, (64,)))
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PrivateTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=16),
            noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp",
            grad_sample_mode="bk", noise_prefetch=True)
    source = trainer._noise_source
    _break_block(source, 2)  # step 1 draws in the foreground; the draw for step 2 breaks
    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="drawing the next step's DP noise failed"):
        trainer.train_round(1)
    (event,) = trainer.ledger.events
    assert event.steps == 2 and event.round == 1
    assert threading.active_count() == threads


# ------------------------------------------------------- the noise inside Opacus's DPOptimizer

NOISE_MULTIPLIER, MAX_GRAD_NORM, EXPECTED_BATCH = 1.3, 0.7, 50


def _zero_gradient_step(secure: bool, seed: int, prefetch: bool = False
                        ) -> tuple[torch.Tensor, bool]:
    """One DP-SGD step whose clipped gradient sum is exactly 0: p.grad is pure noise.

    Returns the concatenated noisy gradient and whether torch's global RNG state
    was left untouched by the step.
    """
    torch.manual_seed(seed)
    model = GradSampleModule(nn.Linear(400, 250))
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=EXPECTED_BATCH,
        loss_reduction="mean",
    )
    if secure:
        use_secure_noise(optimizer, prefetch=prefetch)
    x = torch.randn(EXPECTED_BATCH, 400)
    (model(x) * 0.0).sum().backward()  # every per-example gradient is exactly zero
    torch.manual_seed(seed)
    rng_before = torch.get_rng_state()
    optimizer.step()
    untouched = torch.equal(rng_before, torch.get_rng_state())
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return grad, untouched


@pytest.mark.parametrize("prefetch", [False, True])
def test_secure_noise_in_dp_optimizer_has_the_dp_sgd_standard_deviation(prefetch) -> None:
    """p.grad = N(0, (sigma*C)^2) / expected_batch_size (Opacus scale_grad, reduction mean),
    with the noise drawn in the step or one step ahead."""
    grad, _ = _zero_gradient_step(secure=True, seed=0, prefetch=prefetch)
    n = grad.numel()
    std = NOISE_MULTIPLIER * MAX_GRAD_NORM / EXPECTED_BATCH
    assert abs(float(grad.mean())) < SIX * std / math.sqrt(n)
    assert abs(float(grad.std()) / std - 1.0) < SIX * math.sqrt(1.0 / (2 * n))
    assert stats.kstest(grad.double().numpy() / std, "norm").pvalue > 1e-4


def test_secure_noise_does_not_use_torch_generator() -> None:
    """Seeding torch identically twice gives different noise; torch's RNG is never drawn."""
    plain_1, plain_untouched = _zero_gradient_step(secure=False, seed=123)
    plain_2, _ = _zero_gradient_step(secure=False, seed=123)
    assert torch.equal(plain_1, plain_2)  # control: Opacus's own noise is predictable
    assert not plain_untouched  # ...because it draws from torch's seeded generator

    secure_1, untouched_1 = _zero_gradient_step(secure=True, seed=123)
    secure_2, untouched_2 = _zero_gradient_step(secure=True, seed=123)
    assert not torch.any(secure_1 == secure_2)
    assert untouched_1 and untouched_2


def test_use_secure_noise_rejects_a_plain_optimizer() -> None:
    with pytest.raises(TypeError, match="DPOptimizer"):
        use_secure_noise(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))


def test_noise_is_drawn_ahead_by_default_only_with_a_free_core_and_a_small_model(
        monkeypatch) -> None:
    """``prefetch=None`` draws ahead when a core is free of torch's threads and the model
    has at most PREFETCH_MAX_PARAMS parameters (larger ones are faster block by block
    inside the step); ``True`` / ``False`` force the choice."""
    import bract.privacy.noise as noise_module
    from bract.privacy import threads as cores
    from bract.privacy.noise import NoisePrefetcher, SecureGaussian

    def adder(cpus: int, threads: int, params: int, prefetch=None):
        monkeypatch.setattr(cores, "available_cores", lambda: cpus)
        monkeypatch.setattr(noise_module.torch, "get_num_threads", lambda: threads)
        optimizer = DPOptimizer(torch.optim.SGD(nn.Linear(params, 1, bias=False).parameters(),
                                                lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)
        use_secure_noise(optimizer, prefetch=prefetch)
        return type(optimizer.bract_noise)

    monkeypatch.setattr(noise_module, "PREFETCH_MAX_PARAMS", 1000)
    assert adder(2, 1, 1000) is NoisePrefetcher
    assert adder(2, 1, 1001) is SecureGaussian
    assert adder(2, 2, 10) is SecureGaussian
    assert adder(2, 2, 10, prefetch=True) is NoisePrefetcher
    assert adder(2, 1, 10, prefetch=False) is SecureGaussian
