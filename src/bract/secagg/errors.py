"""Exception hierarchy of the secure-aggregation core.

Every refusal raised by :mod:`bract.secagg` is a :class:`SecAggError`, so an
integration can catch one type; the subclass says *why* a message or input was
refused. A refused message never changes a session's state: handlers validate
everything first and commit only at the end.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "ConsistencyError",
    "EncodingError",
    "KeyRotationRequired",
    "MalformedMessage",
    "ProtocolViolation",
    "ReplayError",
    "RoundAborted",
    "SecAggError",
    "ThresholdPolicyError",
]


class SecAggError(Exception):
    """Base class of every error raised by ``bract.secagg``."""


class ConfigurationError(SecAggError):
    """A roster, policy or session parameter is invalid (duplicate or missing node ids...)."""


class MalformedMessage(SecAggError):  # noqa: N818 (names fixed by the issue)
    """A message is truncated, not canonical, has a missing/extra field or a wrong type."""


class EncodingError(SecAggError):
    """An input vector or weight cannot be encoded (length, dtype, NaN/Inf, clipping, headroom).

    When the message names a figure of the private input (the weight, how many values
    are out of range, their size), ``public_reason`` is the same refusal without it:
    the only text an integration may send to the server.
    """

    def __init__(self, message: str, *, public_reason: str | None = None) -> None:
        super().__init__(message)
        self.public_reason = public_reason


class AuthenticationError(SecAggError):
    """A signature or an AES-GCM tag did not verify, or a key does not match the roster."""


class ProtocolViolation(SecAggError):  # noqa: N818 (names fixed by the issue)
    """A peer (usually the server) asked for something the protocol forbids."""


class ReplayError(ProtocolViolation):
    """A message belongs to another federation, round or stage."""


class ThresholdPolicyError(ProtocolViolation):
    """The server's threshold or graph is weaker than the client's own policy."""


class ConsistencyError(ProtocolViolation):
    """Different clients were shown different alive sets, or a set lacks a signature quorum."""


class KeyRotationRequired(ProtocolViolation):
    """A client has no (current) share-channel key: it must advertise one first."""


class RoundAborted(SecAggError):  # noqa: N818 (names fixed by the issue)
    """The round cannot finish; nothing more is revealed.

    ``cheaters`` names the clients caught sending a share that does not open its
    dealer's commitment, or dealing shares that do not open their own.
    """

    def __init__(self, why: str, cheaters: tuple[int, ...] = ()) -> None:
        super().__init__(why)
        self.cheaters = tuple(cheaters)
