"""Typed protocol messages and their canonical wire form.

Every message is a frozen dataclass whose fields are plain types only: ``int``,
``str``, ``bytes``, ``float`` or a homogeneous list of one of them. So
``to_dict()`` maps one-to-one onto a Flower ``ConfigRecord`` (bulk vectors are a
single ``bytes`` field), and ``to_bytes()`` is a canonical, length-prefixed
encoding of that dict: one message has exactly one byte string, which is what
makes signatures and digests over it unambiguous. Decoding is strict (unknown
or missing fields, wrong types, trailing or truncated data, non-canonical
forms raise :class:`MalformedMessage`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .errors import MalformedMessage
from .merkle import merkle_paths, merkle_root

__all__ = [
    "MESSAGE_TYPES",
    "ConsistencyRequest",
    "ConsistencySignature",
    "KeyAdvertisement",
    "MaskRequest",
    "MaskedInput",
    "Message",
    "RoundConfig",
    "ShareHeader",
    "ShareKeys",
    "UnmaskReply",
    "UnmaskRequest",
    "canonical_decode",
    "canonical_encode",
    "message_from_bytes",
    "message_from_dict",
]

_MAX_DEPTH = 4
_MAX_LEN = 1 << 31
#: Size of a share commitment (SHA-256).
COMMITMENT_BYTES = 32


def canonical_encode(obj: Any) -> bytes:
    """Canonical bytes of ``int | str | bytes | float | list | dict[str, ...]`` (no bools)."""
    out = bytearray()
    _enc(obj, out, 0)
    return bytes(out)


def _enc(obj: Any, out: bytearray, depth: int) -> None:
    t = type(obj)
    if t is bytes:  # fast paths for the common exact types
        out += b"B"
        out += len(obj).to_bytes(4, "big")
        out += obj
        return
    if t is int:
        raw = obj.to_bytes((obj.bit_length() + 8) // 8, "big", signed=True)
        out += b"I"
        out += len(raw).to_bytes(4, "big")
        out += raw
        return
    if t is str:
        raw = obj.encode("utf-8")
        out += b"S"
        out += len(raw).to_bytes(4, "big")
        out += raw
        return
    if depth > _MAX_DEPTH:
        raise MalformedMessage("nesting too deep")
    if isinstance(obj, bool):
        raise MalformedMessage("booleans are not part of the wire format")
    if isinstance(obj, int):
        raw = obj.to_bytes((obj.bit_length() + 8) // 8, "big", signed=True)
        out += b"I" + struct.pack(">I", len(raw)) + raw
    elif isinstance(obj, str):
        raw = obj.encode("utf-8")
        out += b"S" + struct.pack(">I", len(raw)) + raw
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        out += b"B" + struct.pack(">I", len(raw)) + raw
    elif isinstance(obj, float):
        out += b"F" + struct.pack(">d", obj)
    elif isinstance(obj, (list, tuple)):
        out += b"L" + struct.pack(">I", len(obj))
        for item in obj:
            _enc(item, out, depth + 1)
    elif isinstance(obj, dict):
        keys = list(obj)
        if not all(isinstance(k, str) for k in keys):
            raise MalformedMessage("dict keys must be str")
        out += b"D" + struct.pack(">I", len(keys))
        for k in sorted(keys):
            _enc(k, out, depth + 1)
            _enc(obj[k], out, depth + 1)
    else:
        raise MalformedMessage(f"type {type(obj).__name__} is not part of the wire format")


def canonical_decode(data: bytes) -> Any:
    """Strict inverse of :func:`canonical_encode`; rejects anything not canonical."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage("message must be bytes")
    mv = memoryview(data)
    obj, pos = _dec(mv, 0, 0)
    if pos != len(mv):
        raise MalformedMessage(f"{len(mv) - pos} trailing byte(s) after the message")
    return obj


def _take(mv: memoryview, pos: int, n: int) -> tuple[memoryview, int]:
    if n < 0 or pos + n > len(mv):
        raise MalformedMessage("message truncated")
    return mv[pos : pos + n], pos + n


def _dec(mv: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > _MAX_DEPTH:
        raise MalformedMessage("nesting too deep")
    tag, pos = _take(mv, pos, 1)
    t = bytes(tag)
    if t == b"F":
        raw, pos = _take(mv, pos, 8)
        return struct.unpack(">d", raw)[0], pos
    head, pos = _take(mv, pos, 4)
    (n,) = struct.unpack(">I", head)
    if t == b"I":
        raw, pos = _take(mv, pos, n)
        if n == 0:
            raise MalformedMessage("empty integer")
        value = int.from_bytes(raw, "big", signed=True)
        if (value.bit_length() + 8) // 8 != n:
            raise MalformedMessage("non-canonical integer")
        return value, pos
    if t == b"S":
        raw, pos = _take(mv, pos, n)
        try:
            return bytes(raw).decode("utf-8"), pos
        except UnicodeDecodeError as exc:
            raise MalformedMessage("invalid UTF-8 string") from exc
    if t == b"B":
        raw, pos = _take(mv, pos, n)
        return bytes(raw), pos
    if t == b"L":
        if n > len(mv) - pos:
            raise MalformedMessage("message truncated")
        items = []
        for _ in range(n):
            item, pos = _dec(mv, pos, depth + 1)
            items.append(item)
        return items, pos
    if t == b"D":
        if n > len(mv) - pos:
            raise MalformedMessage("message truncated")
        out: dict[str, Any] = {}
        prev: str | None = None
        for _ in range(n):
            key, pos = _dec(mv, pos, depth + 1)
            if not isinstance(key, str):
                raise MalformedMessage("dict key must be a string")
            if prev is not None and key <= prev:
                raise MalformedMessage("dict keys not sorted/unique (non-canonical)")
            prev = key
            out[key], pos = _dec(mv, pos, depth + 1)
        return out, pos
    raise MalformedMessage(f"unknown type tag {t!r}")


_SCALARS = {"int": int, "str": str, "bytes": bytes, "float": float}


def _check_value(cls_name: str, name: str, spec: str, value: Any) -> Any:
    if spec.startswith("list[") and spec.endswith("]"):
        inner = _SCALARS[spec[5:-1]]
        if not isinstance(value, (list, tuple)):
            raise MalformedMessage(f"{cls_name}.{name} must be a list")
        if not all(isinstance(v, inner) and not isinstance(v, bool) for v in value):
            raise MalformedMessage(f"{cls_name}.{name} must be a list of {inner.__name__}")
        if inner is int and any(v < 0 for v in value):
            raise MalformedMessage(f"{cls_name}.{name} must hold non-negative ints")
        return list(value)
    typ = _SCALARS[spec]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or isinstance(value, bool):
        raise MalformedMessage(f"{cls_name}.{name} must be {typ.__name__}")
    if typ is int and value < 0:
        raise MalformedMessage(f"{cls_name}.{name} must be >= 0")
    return value


@dataclass(frozen=True)
class Message:
    """Base class: plain-typed fields, ``kind`` tag, canonical bytes."""

    KIND: ClassVar[str] = ""
    SPEC: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(
                self, f.name, _check_value(type(self).__name__, f.name, self.SPEC[f.name],
                                           getattr(self, f.name))
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (str -> int/str/bytes/float/list of one of them) plus ``kind``."""
        d: dict[str, Any] = {"kind": self.KIND}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, list) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Message:
        """Strictly validated inverse of :meth:`to_dict`."""
        if not isinstance(d, dict):
            raise MalformedMessage("message must be a dict")
        if d.get("kind") != cls.KIND:
            raise MalformedMessage(f"expected a {cls.KIND!r} message, got {d.get('kind')!r}")
        names = {f.name for f in fields(cls)}
        extra = set(d) - names - {"kind"}
        missing = names - set(d)
        if missing:
            raise MalformedMessage(f"{cls.__name__}: missing field(s) {sorted(missing)}")
        if extra:
            raise MalformedMessage(f"{cls.__name__}: unknown field(s) {sorted(extra)}")
        return cls(**{n: d[n] for n in names})

    def to_bytes(self) -> bytes:
        """Canonical bytes of :meth:`to_dict`."""
        return canonical_encode(self.to_dict())

    def digest_input(self) -> bytes:
        """What gets hashed when this message is bound into a signature."""
        return self.to_bytes()


def _list_lengths(msg: Message, *names: str) -> None:
    lengths = {len(getattr(msg, n)) for n in names}
    if len(lengths) > 1:
        raise MalformedMessage(f"{type(msg).__name__}: lists {names} differ in length")


@dataclass(frozen=True)
class KeyAdvertisement(Message):
    """Setup (once per key epoch), client -> server: the signed X25519 key of the
    encrypted share channel.

    ``signature`` is Ed25519 by the node's roster key over (federation id, node id,
    origin, epoch, cipher_public). ``origin`` is the transport identity the
    advertisement must arrive from (the Flower node id in a federation), so one
    hospital cannot answer with another's advertisement and take its identity.
    This key only encrypts shares; no secret of it is ever shared, and mask keys
    are fresh every round (:class:`ShareKeys`).
    """

    KIND: ClassVar[str] = "secagg.v2.advertise"
    SPEC: ClassVar[dict[str, str]] = {
        "federation_id": "str", "node_id": "int", "origin": "int", "epoch": "int",
        "cipher_public": "bytes", "signature": "bytes",
    }
    federation_id: str
    node_id: int
    origin: int
    epoch: int
    cipher_public: bytes
    signature: bytes


@dataclass(frozen=True)
class RoundConfig(Message):
    """Stage 1, server -> every participant (identical for all): the round's parameters.

    Carries the participants, the graph (kind, degree, seed), the per-neighbourhood
    threshold, the collusion bound the round is set up for (``colluders`` c and
    ``min_honest`` h), the encoding parameters and every participant's signed
    share-channel advertisement as parallel lists.
    """

    KIND: ClassVar[str] = "secagg.v2.round_config"
    SPEC: ClassVar[dict[str, str]] = {
        "federation_id": "str", "round": "int", "participants": "list[int]",
        "threshold": "int", "colluders": "int", "min_honest": "int", "graph_kind": "str",
        "degree": "int", "graph_seed": "bytes", "dim": "int", "clip": "float",
        "frac_bits": "int", "max_weight": "int", "ring_bits": "int",
        "key_epochs": "list[int]", "key_origins": "list[int]",
        "cipher_publics": "list[bytes]", "key_signatures": "list[bytes]",
    }
    federation_id: str
    round: int
    participants: list[int]
    threshold: int
    colluders: int
    min_honest: int
    graph_kind: str
    degree: int
    graph_seed: bytes
    dim: int
    clip: float
    frac_bits: int
    max_weight: int
    ring_bits: int
    key_epochs: list[int]
    key_origins: list[int]
    cipher_publics: list[bytes]
    key_signatures: list[bytes]

    def __post_init__(self) -> None:
        super().__post_init__()
        _list_lengths(self, "participants", "key_epochs", "key_origins", "cipher_publics",
                      "key_signatures")

    def advertisement(self, i: int) -> KeyAdvertisement:
        """The key advertisement of ``participants[i]``."""
        return KeyAdvertisement(self.federation_id, self.participants[i], self.key_origins[i],
                                self.key_epochs[i], self.cipher_publics[i],
                                self.key_signatures[i])


@dataclass(frozen=True)
class ShareKeys(Message):
    """Stage 1, client -> server: this round's mask key and Shamir shares, signed.

    ``mask_public`` is a fresh X25519 key for this round only. ``holders`` is the
    sender's closed neighbourhood (sorted); for each holder the sender commits to
    that holder's share of its self-mask seed and of its round mask key
    (``seed_share_commitments``, ``key_share_commitments``: salted SHA-256, 32 bytes
    each, concatenated in holder order) and, for every holder but itself,
    ``ciphertexts`` carries the AES-GCM-encrypted shares and salts (the sender's own
    entry is empty). ``seed_commitment`` binds the seed itself. ``signature`` is
    Ed25519 by the sender's roster key over all of it but the ciphertexts, bound to
    the round's config digest.
    """

    KIND: ClassVar[str] = "secagg.v2.share_keys"
    SPEC: ClassVar[dict[str, str]] = {
        "federation_id": "str", "round": "int", "node_id": "int", "mask_public": "bytes",
        "seed_commitment": "bytes", "holders": "list[int]",
        "seed_share_commitments": "bytes", "key_share_commitments": "bytes",
        "ciphertexts": "list[bytes]", "signature": "bytes",
    }
    federation_id: str
    round: int
    node_id: int
    mask_public: bytes
    seed_commitment: bytes
    holders: list[int]
    seed_share_commitments: bytes
    key_share_commitments: bytes
    ciphertexts: list[bytes]
    signature: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        _list_lengths(self, "holders", "ciphertexts")
        want = COMMITMENT_BYTES * len(self.holders)
        if {len(self.seed_share_commitments), len(self.key_share_commitments)} != {want}:
            raise MalformedMessage(f"ShareKeys: commitments must be {COMMITMENT_BYTES} bytes "
                                   "per holder")

    def commitments(self, i: int) -> tuple[bytes, bytes]:
        """The commitments to ``holders[i]``'s seed share and key share."""
        lo, hi = COMMITMENT_BYTES * i, COMMITMENT_BYTES * (i + 1)
        return self.seed_share_commitments[lo:hi], self.key_share_commitments[lo:hi]

    def commitment_leaves(self) -> list[bytes]:
        """One Merkle leaf per holder: its two commitments."""
        return [b"".join(self.commitments(i)) for i in range(len(self.holders))]

    def commitment_root(self) -> bytes:
        """The Merkle root over every holder's commitments (what the signature covers)."""
        return merkle_root(self.commitment_leaves())

    def holder_headers(self) -> dict[int, bytes]:
        """For each holder, the signed public part it needs (:class:`ShareHeader`): the
        round key, the seed commitment, the root and signature, its own commitments and
        their Merkle path (``O(log n)`` hashes, not every holder's commitments)."""
        root, paths = merkle_paths(self.commitment_leaves())
        return {h: canonical_encode([self.mask_public, self.seed_commitment, root,
                                     self.signature, *self.commitments(i), paths[i]])
                for i, h in enumerate(self.holders)}


@dataclass(frozen=True)
class ShareHeader:
    """A sender's signed share header, as one holder receives it
    (:meth:`ShareKeys.holder_headers`)."""

    mask_public: bytes
    seed_commitment: bytes
    commitment_root: bytes
    signature: bytes
    seed_share_commitment: bytes
    key_share_commitment: bytes
    path: list[bytes]

    @classmethod
    def from_bytes(cls, raw: bytes) -> ShareHeader:
        """Strict parse; :class:`MalformedMessage` names what is wrong."""
        obj = canonical_decode(raw)
        ok = (isinstance(obj, list) and len(obj) == 7
              and all(isinstance(x, bytes) for x in obj[:6]) and isinstance(obj[6], list)
              and all(isinstance(x, bytes) and len(x) == COMMITMENT_BYTES for x in obj[6]))
        if not ok:
            raise MalformedMessage("share header must be 6 byte strings and a list of "
                                   "32-byte path hashes")
        return cls(*obj)

    def leaf(self) -> bytes:
        """This holder's Merkle leaf (its two commitments)."""
        return self.seed_share_commitment + self.key_share_commitment


@dataclass(frozen=True)
class MaskRequest(Message):
    """Stage 2, server -> one client: who shared (U1) and, for each sharing
    neighbour, its signed share header and the ciphertext addressed to this client."""

    KIND: ClassVar[str] = "secagg.v2.mask_request"
    SPEC: ClassVar[dict[str, str]] = {
        "federation_id": "str", "round": "int", "node_id": "int", "sharers": "list[int]",
        "senders": "list[int]", "headers": "list[bytes]", "ciphertexts": "list[bytes]",
    }
    federation_id: str
    round: int
    node_id: int
    sharers: list[int]
    senders: list[int]
    headers: list[bytes]
    ciphertexts: list[bytes]

    def __post_init__(self) -> None:
        super().__post_init__()
        _list_lengths(self, "senders", "headers", "ciphertexts")


@dataclass(frozen=True)
class MaskedInput(Message):
    """Stage 2, client -> server: ``y = enc(x, w) + PRG(b) + sum(+-PRG(s_uv))``, raw ring
    bytes, with the digest of the public data the input was computed from (in a
    federation, the global model it received) and the client's Ed25519 signature over
    (federation, round, config digest, node, that digest)."""

    KIND: ClassVar[str] = "secagg.v3.masked_input"
    SPEC: ClassVar[dict[str, str]] = {
        "federation_id": "str", "round": "int", "node_id": "int", "ring_bits": "int",
        "data": "bytes", "input_digest": "bytes", "signature": "bytes",
    }
    federation_id: str
    round: int
    node_id: int
    ring_bits: int
    data: bytes
    input_digest: bytes
    signature: bytes


@dataclass(frozen=True)
class ConsistencyRequest(Message):
    """Stage 3, server -> alive clients: the sharers U1, the alive set U2 and, for each
    alive client in order, the input digest it signed with its masked input and that
    signature."""

    KIND: ClassVar[str] = "secagg.v3.consistency_request"
    SPEC: ClassVar[dict[str, str]] = {"federation_id": "str", "round": "int",
                                      "sharers": "list[int]", "alive": "list[int]",
                                      "input_digests": "list[bytes]",
                                      "input_signatures": "list[bytes]"}
    federation_id: str
    round: int
    sharers: list[int]
    alive: list[int]
    input_digests: list[bytes]
    input_signatures: list[bytes]

    def __post_init__(self) -> None:
        super().__post_init__()
        _list_lengths(self, "alive", "input_digests", "input_signatures")


@dataclass(frozen=True)
class ConsistencySignature(Message):
    """Stage 3, client -> server: Ed25519 signature over (federation, round, config
    digest, U1, U2)."""

    KIND: ClassVar[str] = "secagg.v2.consistency_signature"
    SPEC: ClassVar[dict[str, str]] = {
        "federation_id": "str", "round": "int", "node_id": "int", "signature": "bytes",
    }
    federation_id: str
    round: int
    node_id: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Stage 4, server -> signers: alive and dropped sets plus the collected signatures."""

    KIND: ClassVar[str] = "secagg.v2.unmask_request"
    SPEC: ClassVar[dict[str, str]] = {
        "federation_id": "str", "round": "int", "alive": "list[int]", "dropped": "list[int]",
        "signers": "list[int]", "signatures": "list[bytes]",
    }
    federation_id: str
    round: int
    alive: list[int]
    dropped: list[int]
    signers: list[int]
    signatures: list[bytes]

    def __post_init__(self) -> None:
        super().__post_init__()
        _list_lengths(self, "signers", "signatures")


@dataclass(frozen=True)
class UnmaskReply(Message):
    """Stage 4, client -> server: shares of the seed for alive peers, of the round mask
    key for dropped ones (never both for one peer), each with the salt that opens
    its dealer's commitment."""

    KIND: ClassVar[str] = "secagg.v2.unmask_reply"
    SPEC: ClassVar[dict[str, str]] = {
        "federation_id": "str", "round": "int", "node_id": "int",
        "seed_owners": "list[int]", "seed_shares": "list[bytes]", "seed_salts": "list[bytes]",
        "key_owners": "list[int]", "key_shares": "list[bytes]", "key_salts": "list[bytes]",
    }
    federation_id: str
    round: int
    node_id: int
    seed_owners: list[int]
    seed_shares: list[bytes]
    seed_salts: list[bytes]
    key_owners: list[int]
    key_shares: list[bytes]
    key_salts: list[bytes]

    def __post_init__(self) -> None:
        super().__post_init__()
        _list_lengths(self, "seed_owners", "seed_shares", "seed_salts")
        _list_lengths(self, "key_owners", "key_shares", "key_salts")


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (KeyAdvertisement, RoundConfig, ShareKeys, MaskRequest, MaskedInput,
                ConsistencyRequest, ConsistencySignature, UnmaskRequest, UnmaskReply)
}


def message_from_dict(d: dict[str, Any]) -> Message:
    """Rebuild any message from its plain dict (dispatch on ``kind``)."""
    if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
        raise MalformedMessage("message dict lacks a 'kind' string")
    cls = MESSAGE_TYPES.get(d["kind"])
    if cls is None:
        raise MalformedMessage(f"unknown message kind {d['kind']!r}")
    return cls.from_dict(d)


def message_from_bytes(data: bytes) -> Message:
    """Rebuild any message from :meth:`Message.to_bytes` output."""
    return message_from_dict(canonical_decode(data))
