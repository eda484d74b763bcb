"""The server's wait for replies: push a stage's messages, then pull until every
reply is in or the timeout passes, polling soon at first and then at most every
``max_poll`` seconds.

Flower 1.42's ``Grid.send_and_receive`` does the same with a fixed sleep between
pulls (3 s on a SuperLink, 0.1 s in the simulation engine), so a stage whose
handlers take milliseconds (a secure-aggregation check or unmask) costs up to 3 s of
waiting. Here the first pulls come after 10, 15, 22... ms and the interval grows
by half each time up to ``max_poll``: a quick stage is seen within a few ms of its
last reply, a long training stage costs one small pull request every ``max_poll``
seconds. The semantics are ``send_and_receive``'s: the replies that arrived (any
order), none waited for past ``timeout`` (``None``: until all are in).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

__all__ = ["FIRST_POLL", "REPLY_POLL_MAX", "send_and_receive"]

#: Seconds before the first pull after pushing.
FIRST_POLL = 0.01
#: The longest wait between two pulls (bract's default; ``ServerConfig.reply_poll``).
REPLY_POLL_MAX = 0.1


def send_and_receive(grid: Any, messages: Iterable[Any], timeout: float | None, *,
                     max_poll: float = REPLY_POLL_MAX) -> list[Any]:
    """Push ``messages`` and return their replies, as ``grid.send_and_receive`` does,
    polling as described in the module text. A grid without ``push_messages`` /
    ``pull_messages`` is asked through its own ``send_and_receive``."""
    messages = list(messages)
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Any] = []
    pause = min(FIRST_POLL, max_poll)
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if not waiting:
            break
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(pause, left))
        else:
            time.sleep(pause)
        pause = min(pause * 1.5, max_poll)
    return replies
