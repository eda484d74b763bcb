"""Who shares secrets and masks with whom.

* ``complete``: every participant is every other's neighbour (Bonawitz et al. 2017).
* ``harary``: the SecAgg+ sparse graph (Bell et al. 2020): a Harary graph
  ``H(k, n)`` (k even, k-regular, k-connected) laid over a server-chosen
  pseudorandom ordering of the participants, with ``k = O(log n)``.

The server picks ``(kind, degree, seed)``; every client recomputes the graph
from those and the participant list, so all clients see the same graph
(the config they saw is bound into the consistency signatures) and each can
check that its own neighbourhood meets its policy. The ordering is not secret:
it only has to be fixed by the config. Neighbourhoods returned here are *closed*
(a node belongs to its own), because secrets are shared among ``N[u]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .crypto import sha256
from .errors import ConfigurationError

__all__ = ["GRAPH_CHOICES", "GRAPH_KINDS", "closed_neighbourhoods", "default_degree"]

GRAPH_KINDS = ("complete", "harary")
#: What a server may be told to use: a graph kind, or ``auto`` (it picks one of them
#: per round, :func:`bract.secagg.protocol.round_parameters`). Rounds carry a kind.
GRAPH_CHOICES = ("auto", *GRAPH_KINDS)


def default_degree(n: int) -> int:
    """SecAgg+-style degree: the even number >= 2 * ceil(log2 n), capped at ``n - 1``."""
    if n <= 2:
        return max(0, n - 1)
    k = 2 * math.ceil(math.log2(n))
    k += k % 2
    return min(k, n - 1)


def closed_neighbourhoods(
    participants: Sequence[int], kind: str, degree: int, seed: bytes
) -> dict[int, tuple[int, ...]]:
    """Closed neighbourhood ``N[u]`` (sorted, includes ``u``) of every participant."""
    nodes = list(participants)
    if len(set(nodes)) != len(nodes):
        raise ConfigurationError("duplicate node ids in the participant list")
    n = len(nodes)
    if kind == "complete" or (kind == "harary" and degree >= n - 1):
        everyone = tuple(sorted(nodes))
        return {u: everyone for u in nodes}
    if kind != "harary":
        raise ConfigurationError(f"unknown graph kind {kind!r}; expected one of {GRAPH_KINDS}")
    if degree < 2 or degree % 2:
        raise ConfigurationError(f"Harary degree must be even and >= 2, got {degree}")
    order = sorted(nodes, key=lambda u: (sha256(seed + u.to_bytes(8, "big")), u))
    half = degree // 2
    out: dict[int, tuple[int, ...]] = {}
    for i, u in enumerate(order):
        nb = {order[(i + j) % n] for j in range(-half, half + 1)}
        out[u] = tuple(sorted(nb))
    return out
