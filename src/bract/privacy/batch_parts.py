"""One DP-SGD step's batch in parts, each part's passes on a thread of its own.

Torch's intra-op threads split every operation of a step between the cores; a small
model's step is many small operations, and they split badly (on 2 cores, the 28x28
ChestCNN's non-private step gains about 1.3x from the second thread, book-keeping's
extra work almost nothing). Book-keeping's clipped sum is a sum over examples of terms
that each depend on one example (or one patient) alone, so the batch can be cut
into disjoint parts instead: each part's forward pass, backward pass and per-example
rules run on their own thread, each with a share of torch's threads, and the parts'
clipped sums are added. The noise is then added once, to the total, by the DP
optimizer.

Guarantee: every example (with patient groups, every patient: all its records go to
one part) is clipped to ``max_grad_norm`` exactly as in one pass of the whole batch,
so the sum handed to the optimizer has the same sensitivity and the step the same
noise and epsilon; it equals the whole batch's clipped sum to float rounding (the
order of the additions changes; tested against the one-pass sum and a per-example
autograd reference). Assumption (as for every per-example method): examples do not
interact in the forward pass, and the forward pass only reads the model (no
BatchNorm running statistics, which DP-SGD refuses anyway), so two threads may run it
at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from bract.privacy.threads import available_cores, core_is_free

if TYPE_CHECKING:
    from bract.privacy.bookkeeping import BookKeepingClipper

__all__ = [
    "MIN_PART_EXAMPLES",
    "MIN_PART_INPUT_ELEMENTS",
    "BatchParts",
    "check_batch_parts",
    "default_batch_parts",
]

#: A step whose batch has fewer examples than this per part runs in one part: handing
#: a few examples to a thread costs more than it saves.
MIN_PART_EXAMPLES = 8
#: The most parts a batch is cut into.
MAX_PARTS = 64
#: ``batch_parts=None`` cuts a batch only when each of its two parts has at least this
#: many input elements: the 128x128 ChestCNN at batch 64 (2^19 per part) gained
#: 1.1-1.3x from the cut on 2 cores, while at 28x28 to 64x64 (2^14.6 to 2^17) the cut
#: and one pass traded places from run to run, and a tabular model's step is Python
#: overhead that two threads only share (docs/benchmarks.md).
MIN_PART_INPUT_ELEMENTS = 1 << 18


def default_batch_parts(device: torch.device, grad_sample_mode: str,
                        rule_overlap: bool | None, example_elements: int = 0,
                        expected_batch: float = 0.0) -> int:
    """What ``batch_parts=None`` picks: 2 for book-keeping on a CPU where torch's
    threads already take every core this process may use and at least 2 of them
    (with a free core, the rules beside the backward pass use it instead), when
    each half of an expected batch has at least :data:`MIN_PART_INPUT_ELEMENTS` input
    elements (``example_elements`` per example); else 1. Only 2 parts on 2 cores has
    been measured; more parts are there to set by hand."""
    if grad_sample_mode != "bk" or device.type != "cpu" or rule_overlap:
        return 1
    if core_is_free() or min(torch.get_num_threads(), available_cores()) < 2:
        return 1
    if example_elements * expected_batch / 2 < MIN_PART_INPUT_ELEMENTS:
        return 1
    return 2


def check_batch_parts(parts: int | None) -> int | None:
    """``parts`` as given (``None``: automatic); ValueError unless it is None or an int
    in ``[1, MAX_PARTS]``."""
    if parts is None:
        return None
    if isinstance(parts, bool) or not isinstance(parts, int) or not 1 <= parts <= MAX_PARTS:
        raise ValueError(f"batch_parts must be None or an int in [1, {MAX_PARTS}], "
                         f"got {parts!r}")
    return parts


PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BatchParts:
    """Runs each step's forward and backward passes as ``parts`` parts of the batch at
    once and leaves the batch's clipped gradient sum in ``.grad`` (as
    :meth:`BookKeepingClipper.backward` does for the whole batch).

    Use as a context manager around a round's steps. The calling thread runs the
    first part, ``parts - 1`` worker threads the others. From construction to
    :meth:`close` torch's intra-op threads are divided between the parts (each part's
    operations, and the optimizer's step between the passes, get ``threads // parts``
    of them); :meth:`close` ends the workers and restores torch's thread count. The
    count is set once for the round, not per step: restoring it for each optimizer
    step and dividing it again measured slower (the 128px step at 1.06x non-private
    against 1.19x on 2 cores; docs/benchmarks.md); OpenMP's idle threads, which spin
    for a while after a parallel region, are the likely cause (not verified).
    """

    def __init__(self, clipper: BookKeepingClipper, parts: int, *,
                 min_part: int = MIN_PART_EXAMPLES) -> None:
        if check_batch_parts(parts) is None or parts < 2:
            raise ValueError(f"BatchParts needs at least 2 parts, got {parts!r}")
        if clipper.overlap is not False:
            raise ValueError("a batch in parts keeps each part's rules in its own pass: "
                             "the clipper must be made with overlap=False")
        if min_part < 1:
            raise ValueError(f"min_part must be >= 1, got {min_part!r}")
        self.clipper = clipper
        self.parts = parts
        #: a batch with fewer examples than this per part runs whole
        self.min_part = min_part
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=parts - 1, thread_name_prefix="bract-batch-part")
        #: torch's intra-op thread count before, restored by :meth:`close`
        self.threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, self.threads_before // parts))

    def __enter__(self) -> BatchParts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the worker threads and restore torch's thread count (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            torch.set_num_threads(self.threads_before)

    def _split(self, batch: int, groups: torch.Tensor | None
               ) -> list[tuple[torch.Tensor | slice, torch.Tensor | None]]:
        """Each part's records (a slice, or an index tensor with groups) and groups."""
        if groups is None:
            bounds = [batch * k // self.parts for k in range(self.parts + 1)]
            return [(slice(a, b), None) for a, b in itertools.pairwise(bounds) if b > a]
        count = int(groups.max()) + 1
        bounds = [count * k // self.parts for k in range(self.parts + 1)]
        out: list[tuple[torch.Tensor | slice, torch.Tensor | None]] = []
        for a, b in itertools.pairwise(bounds):
            where = torch.nonzero((groups >= a) & (groups < b)).flatten()
            if len(where):
                # The part's group ids from 0 (an id no record of the part has is a
                # group of no record: its factor is applied to nothing).
                out.append((where, groups[where] - a))
        return out

    def step(self, per_example_loss: PerExampleLoss, x: torch.Tensor, y: torch.Tensor,
             groups: torch.Tensor | None = None) -> torch.Tensor:
        """Run the forward pass (``per_example_loss(x_part, y_part)``, one loss per
        example, not reduced) and book-keeping's backward pass of every part, and set
        each trainable parameter's ``.grad`` to the batch's clipped sum. Returns the
        per-example losses, detached, in the parts' order. A batch too small to cut
        (fewer than ``min_part`` examples per part) runs whole, on this thread.
        A part that fails fails the step, after every other part has ended."""
        if self._pool is None:
            raise RuntimeError("BatchParts is closed")
        batch = len(y)
        pieces = ([] if batch < self.min_part * self.parts
                  else self._split(batch, groups))
        if len(pieces) < 2:
            loss = per_example_loss(x, y)
            self.clipper.backward(loss, batch, groups=groups)
            return loss.detach()

        def run(where: torch.Tensor | slice, part_groups: torch.Tensor | None):
            loss = per_example_loss(x[where], y[where])
            _, sums = self.clipper.clipped_sums(loss, len(loss), groups=part_groups)
            return loss.detach(), sums

        futures: list[Future] = [self._pool.submit(run, *piece) for piece in pieces[1:]]
        try:
            results = [run(*pieces[0])]
        finally:
            for f in futures:  # every part ends before the step returns or fails
                f.exception()
        results += [f.result() for f in futures]
        totals: dict[torch.nn.Parameter, torch.Tensor] = {}
        for _, sums in results:
            for p, part_sum in sums:
                if p in totals:
                    totals[p] += part_sum
                else:
                    totals[p] = part_sum
        for p, total in totals.items():
            p.grad = total
        return torch.cat([loss for loss, _ in results])
