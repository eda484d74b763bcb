"""The error bract's data loaders and partitioners raise for bad input."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data or a bad data argument: a missing file, a wrong key, an unreadable
    image, labels that do not match the images, a partition that cannot be made.

    The message names the problem and the fix. It is a ``ValueError``, so callers
    that already report ``ValueError`` cleanly (the ``bract`` command) report it too.
    """
