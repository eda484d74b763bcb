"""The error bract's data loaders and partitioners raise for bad input."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data or a bad data argument: a missing file, a wrong key, an unreadable
    image, labels that do not match the images, a partition that cannot be made.

    The message names the problem and the fix. It is a ``ValueError``, so callers
    that already report ``ValueError`` cleanly (the ``bract`` command) report it too.
    ``public_reason``, when given, is what may leave a hospital instead of the message
    (one without its patients' ids, folder names or counts): a hospital's failure
    reply carries only that, and its own log the whole message.
    """

    def __init__(self, message: str, *, public_reason: str | None = None) -> None:
        super().__init__(message)
        if public_reason is not None:
            self.public_reason = public_reason
