"""Which cores count as free for DP-SGD's second thread of work."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bract.flower.simulation import hospital_cores
from bract.privacy import threads


@pytest.fixture(autouse=True)
def _undeclared():
    threads.declare_cores(None)
    yield
    threads.declare_cores(None)


def test_a_declared_share_caps_the_cores_and_a_free_core_needs_one_beyond_torchs() -> None:
    machine = threads.available_cores()
    assert machine == threads.machine_cores()
    if hasattr(os, "sched_getaffinity"):
        assert machine == len(os.sched_getaffinity(0))
    threads.declare_cores(1)
    assert threads.available_cores() == 1
    assert threads.machine_cores() == machine  # a declared share leaves the machine as is
    assert not threads.core_is_free()  # torch uses at least one thread
    threads.declare_cores(machine + 5)
    assert threads.available_cores() == machine  # a share never adds cores
    assert threads.core_is_free() == (machine > torch.get_num_threads())
    with pytest.raises(ValueError, match="at least 1 core"):
        threads.declare_cores(0)


@given(hospitals=st.integers(1, 64), client_threads=st.integers(1, 4),
       cores=st.integers(1, 64))
def test_simulated_hospitals_never_count_a_core_another_one_is_using(
        hospitals, client_threads, cores) -> None:
    """With one hospital per core at a time (the engine's client_resources), the
    hospitals running at once never count more cores than the machine has between
    them, unless their own torch threads already need more; each gets at least its
    torch threads' worth."""
    share = hospital_cores(hospitals, client_threads, cores)
    at_once = min(hospitals, cores)
    assert share >= client_threads
    assert share * at_once <= cores or share == client_threads
    # A hospital alone on the machine may use all of it.
    assert hospital_cores(1, client_threads, cores) == max(client_threads, cores)


def test_a_simulated_hospital_declares_its_share_again_each_setup_without_shrinking_it(
        ) -> None:
    """Setting a hospital up twice in one process (the engine reuses its workers) gives
    the same share both times: it is computed from the machine, not from the share
    declared before."""
    from bract.flower.simulation import train_beside_other_hospitals

    threads_before = torch.get_num_threads()
    try:
        shares = []
        for _ in range(2):
            train_beside_other_hospitals(3, 1)
            shares.append(threads.available_cores())
        assert shares[0] == shares[1] == hospital_cores(3, 1, threads.machine_cores())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads_before)
