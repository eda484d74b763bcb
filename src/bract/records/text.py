"""Text someone else chose, made fit for the operator's screen and the run's records.

A hospital's failure reason, the reason of its budget decision and its name reach the
coordinator's console (a ``rich`` live table or log lines), ``report.json``, the
checkpoint and the audit's findings. :func:`one_line` is the one sanitiser every such
string passes through before it is stored or shown.

Pure: imports neither flwr nor torch (nor rich: escaping markup is the observer's).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MAX_TEXT", "TRUNCATED", "one_line"]

#: The longest text :func:`one_line` returns by default (a hospital's reason).
MAX_TEXT = 500
#: What ends a text :func:`one_line` cut short.
TRUNCATED = "... (truncated)"

#: C0 and C1 control characters (ESC, CR, BEL, the 8-bit CSI ...), DEL, the Unicode
#: line and paragraph separators, the bidirectional overrides and isolates (which
#: reorder what a terminal shows) and lone surrogates (which no file or terminal can
#: encode): each becomes a space.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                          "\ud800-\udfff]")


def one_line(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` (a text; anything else by its ``repr``) as one line of printable text.

    Guarantee: the result holds no control character (C0, C1, DEL), no line or
    paragraph separator, no bidirectional override and no lone surrogate (each is
    replaced by a space), no run of whitespace longer than one space and none at
    either end, and at most ``limit`` characters; a text that had to be cut ends with
    :data:`TRUNCATED`. Printable characters are kept as they are (``[`` included:
    whoever prints through ``rich`` markup escapes it). Linear in ``limit``, not in
    the length of ``value``: only its first ``4 * limit`` characters are read."""
    if limit <= len(TRUNCATED):
        raise ValueError(f"limit must exceed {len(TRUNCATED)} characters")
    raw = value if isinstance(value, str) else repr(value)
    head = raw[: 4 * limit]
    text = " ".join(_UNPRINTABLE.sub(" ", head).split())
    if len(text) > limit or len(raw) > len(head):
        text = text[: limit - len(TRUNCATED)].rstrip() + TRUNCATED
    return text
