"""What the server of :mod:`bract.secagg` saw, recorded message by message.

:class:`RecordingServerSession` is a :class:`~bract.secagg.protocol.ServerSession`
that logs every message it receives and sends; :class:`ServerView` is one round of
that log (plus, separately, the ground truth an auditor may know);
:func:`write_view` / :func:`read_view` store views as files. ``bract audit secagg``
(:mod:`bract.audit.secagg_audit`) checks them; the Flower server
(:mod:`bract.flower.secagg_server`) writes them with ``--record-secagg``. Views of
protocol v1 (commit 72e210b and before) are read as :class:`LegacyMessage` records.

File format of one round (``DIR/round-N/``): ``messages.bin`` is a sequence of
records, each one direction byte (``I`` in, ``O`` out, ``L`` late), a 4-byte
big-endian length and the message's canonical bytes; ``aggregate.npz`` holds the
round, the decoded weighted sum, the total weight, an ``aborted`` flag and, for a
round that never opened, why (``never_opened``; its ``messages.bin`` is empty), and,
for a round open when the run stopped, why (``interrupted``); a later attempt of a
round (a resumed run's re-run) is recorded beside it in ``DIR/round-N-attempt-K/``;
``inputs.npz``, when present, the auditor's ground truth.

Pure: imports neither flwr nor torch.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .encoding import EncodingConfig
from .messages import (
    KeyAdvertisement,
    MaskedInput,
    MaskRequest,
    Message,
    RoundConfig,
    ShareKeys,
    UnmaskReply,
    UnmaskRequest,
    canonical_decode,
    canonical_encode,
    message_from_dict,
)
from .protocol import ServerSession

__all__ = ["LegacyMessage", "RecordingServerSession", "ServerView", "read_view", "view_directory",
           "write_view"]

_DIRECTIONS = {"in": b"I", "out": b"O", "late": b"L"}
_DIRECTION_OF = {v: k for k, v in _DIRECTIONS.items()}


@dataclass(frozen=True)
class LegacyMessage:
    """A message of protocol v1 read from an old recording, kept as its plain fields."""

    kind: str
    fields: dict[str, Any]

    def to_bytes(self) -> bytes:
        """The canonical bytes it was read from."""
        return canonical_encode({"kind": self.kind, **self.fields})


_V1_KINDS = ("secagg.advertise", "secagg.round_config", "secagg.share_keys",
             "secagg.mask_request", "secagg.masked_input", "secagg.consistency_request",
             "secagg.consistency_signature", "secagg.unmask_request", "secagg.unmask_reply")


#: Kinds protocol v3 replaced (inputs now carry the signed digest of their model).
_V2_ONLY_KINDS = ("secagg.v2.masked_input", "secagg.v2.consistency_request")


def _message_from_raw(raw: bytes) -> Message | LegacyMessage:
    d = canonical_decode(raw)
    if isinstance(d, dict) and d.get("kind") in _V1_KINDS:
        return LegacyMessage(d["kind"], {k: v for k, v in d.items() if k != "kind"})
    if isinstance(d, dict) and d.get("kind") in _V2_ONLY_KINDS:
        raise ValueError("this view was recorded with secure-aggregation protocol v2 (before "
                         "masked inputs carried the signed digest of their global model); "
                         "this audit reads views of protocol v3: record the run again")
    return message_from_dict(d)


def own_sharer_lists(requests: Iterable[tuple[int, Sequence[int]]]) -> dict[int, set[int]]:
    """Each addressee's sharer list, from ``(node_id, sharers)`` of the mask requests sent.

    A node sent several requests (it answers one) gets their intersection: the peers
    it masked with whichever it answered. Assuming fewer pair masks than a client
    applied never hides an isolable sum from an audit; assuming one it never applied
    could."""
    out: dict[int, set[int]] = {}
    for node, sharers in requests:
        out[node] = out[node] & set(sharers) if node in out else set(sharers)
    return out


@dataclass
class ServerView:
    """What the server saw in one round, and (separately) the truth an auditor knows.

    ``messages`` are ``(direction, message)`` in order: ``"in"`` received by the
    server, ``"out"`` sent by it, ``"late"`` a dropped client's masked input that
    the audit obtained after the round (what a late arrival would have shown).
    ``inputs`` (node -> (vector, weight)) is not part of the server's view: it
    is the ground truth the independence and aggregate checks compare with.
    """

    round: int
    messages: list[tuple[str, Any]]
    weighted_sum: np.ndarray
    total_weight: int
    inputs: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)
    #: The round aborted: no aggregate, but what the server received still counts.
    aborted: bool = False
    #: Why the round never opened (the server sent no round configuration: e.g. fewer
    #: than 3 hospitals held keys), or ``""``. A view so marked holds no message: it
    #: records that the round existed and that the server received nothing in it.
    never_opened: str = ""
    #: Why the run stopped while this round was open (an interrupt, or an error that
    #: ended the run), or ``""``. Such a view is also ``aborted``: it holds what the
    #: server had seen of the round when the run stopped. A resumed run that re-runs
    #: the round records the re-run beside it (``round-N-attempt-K``).
    interrupted: str = ""

    def _of(self, direction: str, cls: type[Message]) -> list[Any]:
        return [m for d, m in self.messages if d == direction and isinstance(m, cls)]

    @property
    def legacy(self) -> bool:
        """True for a view recorded with protocol v1."""
        return any(isinstance(m, LegacyMessage) for _, m in self.messages)

    @property
    def config(self) -> RoundConfig:
        """The round's config (sent by the server)."""
        cfgs = self._of("out", RoundConfig)
        if len(cfgs) != 1:
            raise ValueError(f"a round's view needs exactly one RoundConfig (found {len(cfgs)}).")
        return cfgs[0]

    @property
    def share_messages(self) -> dict[int, list[ShareKeys]]:
        """Every distinct share message (round mask key, commitments) for this round the
        server received, by the node it names, in recorded order.

        The recording logs a message before the server checks it, so a node may have
        several: its own and a forged or replayed one the server refused (a bad
        signature, a second message). Which one the server accepted is not in the view
        (the roster is not); an audit either checks signatures against the roster or
        counts what any of them opens. Never only the last or the first: either can be
        the refused one."""
        rnd = self.config.round
        out: dict[int, list[ShareKeys]] = {}
        seen: set[bytes] = set()
        for m in self._of("in", ShareKeys):
            raw = m.to_bytes()
            if m.round == rnd and raw not in seen:
                seen.add(raw)
                out.setdefault(m.node_id, []).append(m)
        return out

    @property
    def masked(self) -> dict[int, MaskedInput]:
        """Masked inputs the server received, by node."""
        return {m.node_id: m for m in self._of("in", MaskedInput)}

    @property
    def late(self) -> dict[int, MaskedInput]:
        """Masked inputs of dropped clients obtained after the round, by node."""
        return {m.node_id: m for m in self._of("late", MaskedInput)}

    @property
    def unmask_request(self) -> UnmaskRequest:
        """The server's unmask request (alive and dropped sets)."""
        reqs = self._of("out", UnmaskRequest)
        if len(reqs) != 1:
            raise ValueError("the view holds no unmask request: the round did not reach "
                             "unmasking, so there is nothing to audit.")
        return reqs[0]

    @property
    def unmask_replies(self) -> list[UnmaskReply]:
        """Unmask replies the server received."""
        return self._of("in", UnmaskReply)

    @property
    def sharers(self) -> tuple[int, ...]:
        """Clients that shared keys in stage 1, as the first mask request lists them (an
        honest server sends every client the same list; see :attr:`sharer_lists`)."""
        reqs = self._of("out", MaskRequest)
        return tuple(reqs[0].sharers) if reqs else ()

    @property
    def sharer_lists(self) -> dict[int, set[int]]:
        """Each client's own sharer list, from the mask request the server sent it: the
        peers (within its neighbourhood) whose pair masks its masked input holds. A
        client sent several requests (a dishonest server) gets their intersection,
        the peers it masked with whichever one it answered."""
        return own_sharer_lists((m.node_id, m.sharers) for m in self._of("out", MaskRequest))


class RecordingServerSession(ServerSession):
    """A :class:`ServerSession` that logs every message it receives and sends, in order.

    Behaviour is exactly the parent's; the log is the server's view of the
    protocol (:attr:`log`), one ``(direction, message)`` per message.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, Message]] = []

    def receive_advertisement(self, adv: KeyAdvertisement, origin: int | None = None) -> None:
        self.log.append(("in", adv))
        super().receive_advertisement(adv, origin)

    def start_round(self, round_number: int, participants: Sequence[int],
                    dim: int, *, encoding: EncodingConfig | None = None) -> RoundConfig:
        cfg = super().start_round(round_number, participants, dim, encoding=encoding)
        self.log.append(("out", cfg))
        return cfg

    def start_next_round(self, round_number: int, participants: Sequence[int],
                         dim: int, *, encoding: EncodingConfig | None = None) -> RoundConfig:
        cfg = super().start_next_round(round_number, participants, dim, encoding=encoding)
        self.log.append(("out", cfg))
        return cfg

    def receive_shares(self, msg: Any, *, sender: int | None = None) -> None:
        self.log.append(("in", msg))
        super().receive_shares(msg, sender=sender)

    def mask_requests(self) -> dict[int, MaskRequest]:
        reqs = super().mask_requests()
        self.log.extend(("out", r) for _, r in sorted(reqs.items()))
        return reqs

    def receive_masked_input(self, msg: MaskedInput, *, sender: int | None = None) -> None:
        self.log.append(("in", msg))
        super().receive_masked_input(msg, sender=sender)

    def consistency_request(self) -> Any:
        req = super().consistency_request()
        self.log.append(("out", req))
        return req

    def receive_consistency_signature(self, msg: Any, *, sender: int | None = None) -> None:
        self.log.append(("in", msg))
        super().receive_consistency_signature(msg, sender=sender)

    def unmask_request(self) -> UnmaskRequest:
        req = super().unmask_request()
        self.log.append(("out", req))
        return req

    def receive_unmask_reply(self, msg: UnmaskReply, *, sender: int | None = None) -> None:
        self.log.append(("in", msg))
        super().receive_unmask_reply(msg, sender=sender)


def write_view(view: ServerView, directory: Path) -> Path:
    """Write one round's view: ``messages.bin``, ``aggregate.npz`` and, if known, ``inputs.npz``.

    ``messages.bin`` is a sequence of records: one direction byte (``I`` in,
    ``O`` out, ``L`` late), a 4-byte big-endian length, and the message's
    canonical bytes (:meth:`bract.secagg.messages.Message.to_bytes`).

    Guarantee: a ``directory`` that does not exist yet (how a server records each
    round, :func:`view_directory`) appears whole or not at all: the files are written
    and synced in a hidden sibling directory that is then renamed into place, so a
    stop or crash mid-write never leaves a partial round for the audit to misread. An
    existing directory is written into in place.
    """
    directory = Path(directory)
    if directory.exists():
        return _write_view_files(view, directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)  # a leftover of a crashed earlier write
    partial.mkdir()
    _write_view_files(view, partial)
    for name in os.listdir(partial):
        with open(partial / name, "rb") as f:
            os.fsync(f.fileno())
    os.rename(partial, directory)
    fd = os.open(directory.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return directory


def _write_view_files(view: ServerView, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "messages.bin", "wb") as f:
        for d, msg in view.messages:
            raw = msg.to_bytes()
            f.write(_DIRECTIONS[d] + struct.pack(">I", len(raw)) + raw)
    np.savez(directory / "aggregate.npz", round=np.int64(view.round),
             weighted_sum=view.weighted_sum, total_weight=np.int64(view.total_weight),
             aborted=np.bool_(view.aborted), never_opened=np.str_(view.never_opened),
             interrupted=np.str_(view.interrupted))
    if view.inputs:
        nodes = sorted(view.inputs)
        np.savez(directory / "inputs.npz", nodes=np.array(nodes, dtype=np.int64),
                 vectors=np.stack([np.asarray(view.inputs[u][0]) for u in nodes]),
                 weights=np.array([view.inputs[u][1] for u in nodes], dtype=np.int64))
    return directory


def _read_one(directory: Path) -> ServerView:
    raw = (directory / "messages.bin").read_bytes()
    messages: list[tuple[str, Message]] = []
    pos = 0
    while pos < len(raw):
        if pos + 5 > len(raw):
            raise ValueError(f"{directory / 'messages.bin'} is truncated at byte {pos}.")
        tag, (length,) = raw[pos:pos + 1], struct.unpack(">I", raw[pos + 1:pos + 5])
        if tag not in _DIRECTION_OF or pos + 5 + length > len(raw):
            raise ValueError(f"{directory / 'messages.bin'} is malformed at byte {pos}.")
        messages.append((_DIRECTION_OF[tag], _message_from_raw(raw[pos + 5:pos + 5 + length])))
        pos += 5 + length
    with np.load(directory / "aggregate.npz", allow_pickle=False) as agg:
        view = ServerView(int(agg["round"]), messages, np.asarray(agg["weighted_sum"]),
                          int(agg["total_weight"]),
                          aborted=bool(agg["aborted"]) if "aborted" in agg else False,
                          never_opened=(str(agg["never_opened"]) if "never_opened" in agg
                                        else ""),
                          interrupted=(str(agg["interrupted"]) if "interrupted" in agg
                                       else ""))
    truth = directory / "inputs.npz"
    if truth.exists():
        with np.load(truth, allow_pickle=False) as t:
            view.inputs = {int(u): (np.asarray(x), int(w))
                           for u, x, w in zip(t["nodes"], t["vectors"], t["weights"],
                                              strict=True)}
    return view


_VIEW_NAME = re.compile(r"round-(\d+)(?:-attempt-(\d+))?")


def _view_order(path: Path) -> tuple[int, int, str]:
    """``round-N`` and its later attempts ``round-N-attempt-K`` in the order they were
    recorded (round, then attempt); any other name after them, by name."""
    m = _VIEW_NAME.fullmatch(path.name)
    if m is None:
        return (2**62, 0, path.name)
    return (int(m[1]), int(m[2] or 1), path.name)


def view_directory(root: Path, rnd: int) -> Path:
    """Where a server records FL round ``rnd``'s view under ``root``: ``round-N``, or,
    when an earlier attempt of the round (an interrupted run's, before a resume) is
    there already, ``round-N-attempt-K`` with the next free K >= 2. An earlier record
    is never overwritten."""
    first = Path(root) / f"round-{rnd}"
    if not first.exists():
        return first
    k = 2
    while (Path(root) / f"round-{rnd}-attempt-{k}").exists():
        k += 1
    return Path(root) / f"round-{rnd}-attempt-{k}"


def read_view(directory: Path) -> list[ServerView]:
    """Read the view(s) in ``directory``: one round, or ``round-*`` subdirectories
    (``round-N`` before its later attempts ``round-N-attempt-K``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"no recorded view at {directory} (expected a directory written by "
                         "write_view or bract audit secagg --out).")
    if (directory / "messages.bin").exists():
        return [_read_one(directory)]
    rounds = sorted((p for p in directory.glob("round-*") if (p / "messages.bin").exists()),
                    key=_view_order)
    if not rounds:
        raise ValueError(f"{directory} holds no messages.bin and no round-*/messages.bin.")
    return [_read_one(p) for p in rounds]


