"""What a hospital's failure reply may say: only text bract wrote for the coordinator.

A hospital's handler that fails answers with an error reply, and its reason reaches the
coordinator's table and ``report.json``. An exception's own text is no such reason: an
``OSError`` names the hospital's files (its state directory, its data), a torch
out-of-memory error names an allocation's size (the size of a Poisson batch, and so
the hospital's record count), a library's or a hospital loader's message may quote its
data. :func:`failure_reason` lets out only

* the ``public_reason`` of an exception bract raised (the convention of
  :class:`bract.data.DataError`: the same refusal without the paths, folder names or
  figures of the data its message names; :func:`public` marks one), or
* the message of one of bract's refusals, written from what the coordinator asked
  and what the hospital's policy allows (:class:`~bract.flower.hospital_policy.
  PolicyRefusal`, :class:`~bract.flower.secagg_client.PlainAggregationRefused`,
  :class:`~bract.privacy.PrivacyError`, :class:`~bract.secagg.errors.SecAggError`);

any other exception leaves as its type's name and :data:`PRIVATE_DETAILS`, the whole
message staying in the hospital's own log.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["MAX_REASON", "PRIVATE_DETAILS", "failure_reason", "public"]

#: What a failure reply carries in place of a message that may not leave the hospital.
PRIVATE_DETAILS = "details in the hospital's log"
#: The longest reason a failure reply carries.
MAX_REASON = 300

E = TypeVar("E", bound=BaseException)


def public(exc: E, reason: str | None = None) -> E:
    """``exc`` with a ``public_reason``: ``reason``, or its whole message when that holds
    nothing of the hospital's (only what the coordinator sent, or what its operator must
    fix in words any hospital would use). Returns ``exc``, to be raised."""
    exc.public_reason = str(exc) if reason is None else reason  # type: ignore[attr-defined]
    return exc


def _refusals() -> tuple[type[BaseException], ...]:
    from bract.flower.hospital_policy import PolicyRefusal
    from bract.flower.secagg_client import PlainAggregationRefused
    from bract.privacy import PrivacyError
    from bract.secagg.errors import SecAggError

    return (PolicyRefusal, PlainAggregationRefused, PrivacyError, SecAggError)


def failure_reason(exc: BaseException) -> str:
    """The one line a hospital's failure reply carries for ``exc``.

    Guarantee: the line is ``exc``'s ``public_reason`` when it has one; else the
    message of one of bract's refusals (prefixed with its type's name unless it is a
    ``ValueError``); else only ``"<type> (details in the hospital's log)"``: no text
    of an ``OSError``, a library's or a hospital loader's exception, nor of one of
    bract's other errors, leaves. At most :data:`MAX_REASON` characters, one line."""
    public_reason = getattr(exc, "public_reason", None)
    if isinstance(public_reason, str) and public_reason.strip():
        text = " ".join(public_reason.split())
    elif isinstance(exc, _refusals()) and str(exc).strip():
        text = " ".join(str(exc).split())
        if not isinstance(exc, ValueError):  # a refusal of the protocol or the policy
            text = f"{type(exc).__name__}: {text}"
    else:
        return f"{type(exc).__name__} ({PRIVATE_DETAILS})"
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."
