"""Whether a second thread of work has a core to itself.

DP-SGD's extra work that does not depend on the step's arithmetic order (drawing the
next step's noise, book-keeping's per-example rules) can run beside torch's own
threads when this process has a core they leave free; where it has none, a second
thread would only take time from torch. The choice changes when values are
computed, never which values.

A process that shares the machine with others training at the same time (simulated
hospitals, several per machine) declares its share with :func:`declare_cores`, so
that a core another hospital is using does not count as free.
"""

from __future__ import annotations

import os

import torch

__all__ = ["available_cores", "core_is_free", "declare_cores", "machine_cores"]

#: The cores this process may use, when declared (``None``: every core it may run on).
_DECLARED: int | None = None


def declare_cores(count: int | None) -> None:
    """Declare how many cores this process may use (``None``: all it may run on).
    Raises ValueError for a count below 1."""
    global _DECLARED
    if count is not None and count < 1:
        raise ValueError(f"a process needs at least 1 core, got {count}")
    _DECLARED = count


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system reports
    one), whatever share it declared."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1)


def available_cores() -> int:
    """The cores this process may use: :func:`machine_cores`, at most the count
    :func:`declare_cores` set."""
    cores = machine_cores()
    return min(cores, _DECLARED) if _DECLARED is not None else cores


def core_is_free() -> bool:
    """Whether this process has more cores than torch's intra-op threads use."""
    return available_cores() > torch.get_num_threads()
