"""How soon a Flower process asks again for a message's contents that are not there yet.

In Flower 1.42 a message travels as a header and a tree of objects (its arrays and
records), each pulled separately (``flwr.supercore.inflatable.inflatable_utils.
pull_objects``). A process that pulls a header before the sender has finished
uploading the objects is told "unavailable" and retries after **1 s**, doubling up to
10 s (``PULL_INITIAL_BACKOFF``, ``PULL_BACKOFF_CAP``). On a deployment that answers in
a fraction of a second this is a hidden, random cost of about a second per message:
a SuperNode pulling a message the server is still uploading, a ClientApp pulling its
message from a SuperNode that is still receiving it, the server pulling a reply.

:func:`shorten_object_pull_backoff` makes those retries start after
:data:`INITIAL_BACKOFF` s and double up to :data:`BACKOFF_CAP` s, in the process that
calls it (bract's SuperNode, its warm ClientApp parent, bract's ServerApp). The same
objects are pulled and checked by Flower as before. Because retries come faster, a
pull gives up on Flower's time limit (``PULL_MAX_TIME``, 7200 s) rather than on its
count of tries (500, which at 0.2 s would be under 2 minutes): a pull that would have
succeeded still succeeds; it only asks sooner. Each retry is one small request.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["BACKOFF_CAP", "FLOWER_BACKOFF", "INITIAL_BACKOFF", "shorten_object_pull_backoff"]

#: Flower 1.42's (initial backoff, backoff cap) for a pull of an unavailable object.
FLOWER_BACKOFF = (1, 10)
#: bract's first retry after "unavailable" (s), and the longest pause between retries.
INITIAL_BACKOFF = 0.01
BACKOFF_CAP = 0.2


def _with_defaults(fn: Callable[..., Any], **values: float) -> None:
    """Set the default of each named parameter of ``fn`` (in place)."""
    params = inspect.signature(fn).parameters
    positional = [n for n, p in params.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    defaults = list(fn.__defaults__ or ())
    keyword = dict(fn.__kwdefaults__ or {})
    first = len(positional) - len(defaults)
    for name, value in values.items():
        if name in keyword:
            keyword[name] = value
        elif name in positional and positional.index(name) >= first:
            defaults[positional.index(name) - first] = value
        else:
            raise RuntimeError(f"{fn.__qualname__}({name}) has no default to shorten")
    fn.__defaults__ = tuple(defaults) or None
    fn.__kwdefaults__ = keyword or None


def shorten_object_pull_backoff() -> None:
    """In this process, retry a pull of a not-yet-available object after
    :data:`INITIAL_BACKOFF` s, doubling up to :data:`BACKOFF_CAP` s (Flower: 1 s up to
    10 s). Idempotent; raises ``RuntimeError`` if Flower's functions no longer read as
    they did in the pinned release."""
    from flwr.supercore.inflatable import inflatable_utils as utils

    for fn in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        current = inspect.signature(fn).parameters
        for name in ("initial_backoff", "backoff_cap", "max_tries_per_object", "max_time"):
            if name not in current:
                raise RuntimeError(f"Flower's {fn.__qualname__} has no {name} parameter")
        _with_defaults(fn, initial_backoff=INITIAL_BACKOFF, backoff_cap=BACKOFF_CAP,
                       max_tries_per_object=None)
