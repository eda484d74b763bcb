"""Thin wrappers over pyca ``cryptography``: Ed25519, X25519, HKDF, AES-GCM, AES-CTR.

Nothing here implements a primitive; every function delegates to
``cryptography`` and only fixes parameters (SHA-256 HKDF, 256-bit AES keys,
96-bit random GCM nonces) and turns library exceptions into
:class:`~bract.secagg.errors.AuthenticationError`. All randomness comes from
``os.urandom`` (the OS CSPRNG).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import AuthenticationError, ConfigurationError

KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 12
GCM_TAG_BYTES = 16
_ZERO_IV = bytes(16)

__all__ = [
    "KEY_BYTES",
    "SIGNATURE_BYTES",
    "STREAM_BLOCK",
    "KeystreamAccumulator",
    "KeystreamBlocks",
    "SigningKey",
    "aead_decrypt",
    "aead_encrypt",
    "check_x25519_public",
    "hkdf",
    "keystream",
    "random_bytes",
    "sha256",
    "verify_signature",
    "x25519_generate",
    "x25519_private",
    "x25519_public",
    "x25519_shared",
]


def random_bytes(n: int) -> bytes:
    """Return ``n`` bytes from the OS CSPRNG (``os.urandom``)."""
    return os.urandom(n)


def sha256(data: bytes) -> bytes:
    """SHA-256 digest (collision resistance is what binds signed statements)."""
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


class SigningKey:
    """A long-term Ed25519 identity key.

    Guarantee: signatures are unforgeable (EUF-CMA) without the private key; the
    matching public key must reach peers through the operator's roster, never the
    server.
    """

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._key = private

    @classmethod
    def generate(cls) -> SigningKey:
        """Fresh key from the OS CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> SigningKey:
        """Load a raw 32-byte Ed25519 private key."""
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            raise ConfigurationError("an Ed25519 private key is 32 raw bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def to_bytes(self) -> bytes:
        """Raw 32-byte private key (a secret: store it as one)."""
        from cryptography.hazmat.primitives import serialization

        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def public_bytes(self) -> bytes:
        """Raw 32-byte public key, as listed in the roster."""
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over ``message``."""
        return self._key.sign(message)


_PUBLIC_CACHE: dict[bytes, Ed25519PublicKey] = {}


def verify_signature(public_key: bytes, signature: bytes, message: bytes, what: str) -> None:
    """Verify an Ed25519 signature; raise :class:`AuthenticationError` naming ``what``."""
    if len(signature) != SIGNATURE_BYTES:
        raise AuthenticationError(f"{what}: signature must be 64 bytes, got {len(signature)}")
    key = _PUBLIC_CACHE.get(public_key)
    if key is None:
        try:
            key = Ed25519PublicKey.from_public_bytes(public_key)
        except ValueError as exc:
            raise AuthenticationError(f"{what}: invalid Ed25519 public key") from exc
        if len(_PUBLIC_CACHE) < 100_000:
            _PUBLIC_CACHE[public_key] = key
    try:
        key.verify(signature, message)
    except InvalidSignature as exc:
        raise AuthenticationError(f"{what}: signature does not verify") from exc


def x25519_generate() -> tuple[bytes, bytes]:
    """Fresh X25519 key pair ``(private_raw, public_raw)`` from the OS CSPRNG."""
    from cryptography.hazmat.primitives import serialization

    sk = X25519PrivateKey.generate()
    priv = sk.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return priv, x25519_public(priv)


def x25519_public(private: bytes) -> bytes:
    """Public key of a raw X25519 private key."""
    from cryptography.hazmat.primitives import serialization

    try:
        sk = X25519PrivateKey.from_private_bytes(private)
    except ValueError as exc:
        raise AuthenticationError("invalid X25519 private key") from exc
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_private(private: bytes) -> X25519PrivateKey:
    """Load a raw X25519 private key once, to reuse it for many exchanges."""
    try:
        return X25519PrivateKey.from_private_bytes(private)
    except ValueError as exc:
        raise AuthenticationError("invalid X25519 private key") from exc


def x25519_shared(private: bytes | X25519PrivateKey, peer_public: bytes) -> bytes:
    """Raw X25519 shared secret; never use it as a key directly, pass it through :func:`hkdf`.

    Raises :class:`AuthenticationError` for an invalid or low-order peer key.
    """
    try:
        sk = private if isinstance(private, X25519PrivateKey) else (
            X25519PrivateKey.from_private_bytes(private))
        pk = X25519PublicKey.from_public_bytes(peer_public)
        return sk.exchange(pk)
    except ValueError as exc:
        raise AuthenticationError("X25519 exchange failed (invalid or low-order key)") from exc


_PROBE: X25519PrivateKey | None = None


def check_x25519_public(public: bytes, what: str) -> None:
    """Refuse an X25519 public key that is not 32 bytes or is of low order.

    A low-order point forces every exchange with it to the all-zero secret; the
    check is one exchange with a throwaway key, which ``cryptography`` refuses for
    exactly those points.
    """
    global _PROBE
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        raise AuthenticationError(f"{what}: an X25519 public key is 32 bytes")
    if _PROBE is None:
        _PROBE = X25519PrivateKey.generate()
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise AuthenticationError(f"{what}: invalid or low-order X25519 public key") from exc


def hkdf(ikm: bytes, info: bytes, length: int = KEY_BYTES, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256. ``info`` carries the domain separation (federation, round, pair, purpose)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def aead_encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM with a fresh random 96-bit nonce; returns ``nonce || ciphertext || tag``.

    Confidentiality and integrity of ``plaintext`` and integrity of
    ``associated_data`` hold as long as ``key`` is secret (random nonces: safe for
    far more than 2^32 messages per key, far beyond a federation's lifetime).
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aead_decrypt(key: bytes, blob: bytes, associated_data: bytes, what: str) -> bytes:
    """Inverse of :func:`aead_encrypt`; a wrong key, AD or any flipped bit raises."""
    if len(blob) < NONCE_BYTES + GCM_TAG_BYTES:
        raise AuthenticationError(f"{what}: ciphertext truncated ({len(blob)} bytes)")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise AuthenticationError(
            f"{what}: AES-GCM authentication failed (tampered, misdirected or replayed)"
        ) from exc


def keystream(key: bytes, nbytes: int) -> bytes:
    """``nbytes`` of AES-256-CTR keystream (zero IV) under a one-purpose 256-bit key.

    Pseudorandom as long as AES is a PRP and ``key`` is used for this one stream.
    """
    enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
    return enc.update(bytes(nbytes)) + enc.finalize()


#: Ring elements per keystream block: 1 MiB of uint64 (cache-resident), whatever ``d``.
STREAM_BLOCK = 1 << 17


class KeystreamBlocks:
    """AES-256-CTR keystreams (zero IV) of ``size`` ring elements of ``dtype``, made a
    block of :data:`STREAM_BLOCK` elements at a time into one reused buffer.

    Each key gives one CTR stream continued across its blocks, so the elements are
    those of :func:`keystream` for the same key; pseudorandom as long as AES is a PRP
    and each key serves one stream.
    """

    def __init__(self, size: int, dtype: type) -> None:
        self.size = size
        #: Elements per block: the largest ``values`` that :meth:`under` yields.
        self.block = max(1, min(STREAM_BLOCK, size))
        self._item = np.dtype(dtype).itemsize
        self._zeros = bytes(self.block * self._item)
        # update_into needs block_size - 1 spare bytes after the output.
        self._buf = bytearray(self.block * self._item + 16)
        self._view = np.frombuffer(self._buf, dtype=dtype, count=self.block)

    def under(self, key: bytes) -> Iterator[tuple[slice, np.ndarray]]:
        """``(where, values)`` pairs covering elements ``0..size-1`` in order: the
        keystream under ``key`` (``values`` is a view valid until the next block)."""
        enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
        for start in range(0, self.size, self.block):
            count = min(self.block, self.size - start)
            enc.update_into(memoryview(self._zeros)[:count * self._item],
                            memoryview(self._buf)[:count * self._item + 15])
            yield slice(start, start + count), self._view[:count]


class KeystreamAccumulator:
    """Adds or subtracts AES-CTR keystreams into a ring vector, in place.

    The vector is a ``uint32`` or ``uint64`` numpy array; numpy's wrap-around
    arithmetic is arithmetic modulo 2^32 / 2^64. Keystreams come block by block
    (:class:`KeystreamBlocks`), so the memory held beyond the vector is one 1 MiB
    block whatever its length or the number of streams.
    """

    def __init__(self, acc: np.ndarray) -> None:
        if acc.dtype not in (np.uint32, np.uint64) or acc.ndim != 1:
            raise ConfigurationError("accumulator must be a 1-D uint32 or uint64 array")
        self.acc = acc
        self._stream = KeystreamBlocks(acc.size, acc.dtype)

    def blocks(self, key: bytes) -> Iterator[tuple[slice, np.ndarray]]:
        """The keystream under ``key`` as ring elements: ``(where, values)`` blocks
        covering the vector in order."""
        return self._stream.under(key)

    def add(self, key: bytes) -> None:
        """``acc += keystream(key)`` modulo 2^bits."""
        for where, values in self.blocks(key):
            np.add(self.acc[where], values, out=self.acc[where])

    def subtract(self, key: bytes) -> None:
        """``acc -= keystream(key)`` modulo 2^bits."""
        for where, values in self.blocks(key):
            np.subtract(self.acc[where], values, out=self.acc[where])
