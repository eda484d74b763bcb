"""Whether a second thread of work has a core to itself.

DP-SGD's extra work that does not depend on the step's arithmetic order (drawing the
next step's noise, book-keeping's per-example rules) can run beside torch's own
threads when the machine has a core they leave free; where it has none, a second
thread would only take time from torch. The choice changes when values are
computed, never which values.
"""

from __future__ import annotations

import os

import torch

__all__ = ["core_is_free"]


def core_is_free() -> bool:
    """Whether this machine has more cores than torch's intra-op threads use."""
    return (os.cpu_count() or 1) > torch.get_num_threads()
