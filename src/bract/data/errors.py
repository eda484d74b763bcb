"""The error bract's data loaders and partitioners raise for bad input."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DataError", "os_error_words", "private_details"]


class DataError(ValueError):
    """Bad data or a bad data argument: a missing file, a wrong key, an unreadable
    image, labels that do not match the images, a partition that cannot be made.

    The message names the problem and the fix. It is a ``ValueError``, so callers
    that already report ``ValueError`` cleanly (the ``bract`` command) report it too.
    ``public_reason``, when given, is what may leave a hospital instead of the message
    (one without its files' paths, its folder names, its patients' ids or counts): a
    hospital's failure reply carries only that, and its own log the whole message.
    """

    def __init__(self, message: str, *, public_reason: str | None = None) -> None:
        super().__init__(message)
        if public_reason is not None:
            self.public_reason = public_reason


@contextmanager
def private_details(public_reason: str) -> Iterator[None]:
    """Inside, a :class:`DataError` raised without a ``public_reason`` gets this one
    (for shared helpers whose message names a hospital's file through ``where``)."""
    try:
        yield
    except DataError as exc:
        if getattr(exc, "public_reason", None) is None:
            exc.public_reason = public_reason
        raise


def os_error_words(exc: OSError) -> str:
    """What went wrong in ``exc``, in the operating system's words for its error number
    (e.g. ``Permission denied``), or its type's name without one: never the file names
    an ``OSError``'s own text carries, so it may go into a ``public_reason``."""
    if isinstance(exc.errno, int):
        return os.strerror(exc.errno)
    return type(exc).__name__
