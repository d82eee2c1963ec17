"""Upstream's ``EncryptionParams`` / ``DecryptionParams`` as key sources of our engine (``crypto.keys.KeySource``).

``EncryptionParams.from_string(pw, opslimit, memlimit, salt=)`` derives its key at once (Argon2id), exposes it as
``.key`` and records salt and limits in the file, exactly what our passphrase files store; ``random()`` and
``EncryptionParams(key)`` write raw-key files. ``DecryptionParams.from_key(key)`` opens either kind (the key of a
passphrase file is the derived one, as upstream), ``from_string`` derives from the file's record.
"""

from __future__ import annotations

import enum
from typing import Any

from ...crypto.keys import ARGON2_ALG, KEY_BYTES, MAX_MEMLIMIT, MAX_OPSLIMIT, PWHASH_SALT_BYTES, Passphrase, nacl_module
from ...errors import DecryptionError


def _argon() -> Any:
    return nacl_module().pwhash.argon2id


class OpsLimit(enum.IntEnum):
    """Argon2id CPU cost presets (libsodium's)."""

    MIN = 1
    INTERACTIVE = 2
    MODERATE = 3
    SENSITIVE = 4


class MemLimit(enum.IntEnum):
    """Argon2id memory cost presets (libsodium's, bytes)."""

    MIN = 8192
    INTERACTIVE = 64 << 20
    MODERATE = 256 << 20
    SENSITIVE = 1 << 30


def _limit(value: Any, kind: type[enum.IntEnum], other: type[enum.IntEnum], default: int, cap: int) -> int:
    if isinstance(value, other) or (value is not None and (not isinstance(value, int) or isinstance(value, bool))):
        raise TypeError(f"expected {kind.__name__} or int, got {type(value).__name__}")
    value = default if value is None else int(value)
    if not kind.MIN <= value <= cap:
        raise ValueError(f"{kind.__name__} {value} outside [{int(kind.MIN)}, {cap}]")
    return value


def _bytes(source: str | bytes, encoding: str) -> bytes:
    data = source.encode(encoding) if isinstance(source, str) else bytes(source)
    if not data:
        raise ValueError("Source cannot be empty")
    return data


class EncryptionParams:
    """Encryption for a ``TensorSerializer`` (upstream's API): ``random()``, ``from_string(...)`` or a 32-byte key.

    Args:
        key: exactly 32 bytes.

    Raises:
        TypeError: ``key`` is not bytes-like.
        ValueError: ``key`` is not 32 bytes long.
    """

    OpsLimit = OpsLimit
    MemLimit = MemLimit

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError("Encryption key must be a bytestring; derive one from text with from_string()")
        if len(key) != KEY_BYTES:
            raise ValueError(f"Invalid encryption key length, should be {KEY_BYTES} bytes; got {len(key)} bytes")
        self.key = bytes(key)
        self._kdf: dict[str, Any] = {"alg": "none"}

    @classmethod
    def random(cls) -> EncryptionParams:
        """A fresh random key (keep ``.key`` to decrypt)."""
        return cls(nacl_module().utils.random(KEY_BYTES))

    @classmethod
    def from_string(cls, source: str | bytes, opslimit: OpsLimit | int | None = None,
                    memlimit: MemLimit | int | None = None, salt: str | bytes | None = None, *,
                    encoding: str = "utf-8") -> EncryptionParams:  # fmt: skip
        """A key derived from ``source`` with Argon2id; salt and limits are stored in the file.

        Raises:
            ValueError: empty source, limits out of range, a salt of the wrong length.
            TypeError: a ``MemLimit`` given as opslimit (or the other way round).
        """
        pw = _bytes(source, encoding)
        ops = _limit(opslimit, OpsLimit, MemLimit, OpsLimit.MODERATE, MAX_OPSLIMIT)
        mem = _limit(memlimit, MemLimit, OpsLimit, MemLimit.MODERATE, MAX_MEMLIMIT)
        if salt is None:
            salt_b = nacl_module().utils.random(PWHASH_SALT_BYTES)
        else:
            salt_b = salt.encode(encoding) if isinstance(salt, str) else bytes(salt)
            if len(salt_b) != PWHASH_SALT_BYTES:
                raise ValueError(f"Invalid salt length, should be {PWHASH_SALT_BYTES} bytes; got {len(salt_b)}")
        params = cls(bytes(_argon().kdf(KEY_BYTES, pw, salt_b, opslimit=ops, memlimit=mem)))
        params._kdf = {"alg": ARGON2_ALG, "opslimit": ops, "memlimit": mem, "salt": salt_b.hex()}
        return params

    @property
    def salt(self) -> bytes:
        """The Argon2id salt stored in the file.

        Raises:
            ValueError: a raw key (no key derivation, no salt).
        """
        if self._kdf["alg"] != ARGON2_ALG:
            raise ValueError("An exact binary key is being used: it has no salt")
        return bytes.fromhex(self._kdf["salt"])

    # ---- crypto.keys.KeySource -------------------------------------------------------------------
    def new_kdf(self) -> dict[str, Any]:
        return dict(self._kdf)

    def master_key(self, kdf: dict[str, Any]) -> bytes:
        return self.key

    def __repr__(self) -> str:
        return f"EncryptionParams(<secret>, kdf={self._kdf['alg']!r})"


class DecryptionParams:
    """Decryption for a ``TensorDeserializer`` (upstream's API): ``from_key(key)`` or ``from_string(text)``."""

    def __init__(self) -> None:
        self.key: bytes | None = None
        self.source: bytes | None = None

    @classmethod
    def from_key(cls, key: bytes) -> DecryptionParams:
        """Raises: ValueError: not 32 bytes."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"Invalid decryption key length, should be {KEY_BYTES} bytes; got {len(key)}")
        params = cls()
        params.key = bytes(key)
        return params

    @classmethod
    def from_string(cls, source: str | bytes, *, encoding: str = "utf-8") -> DecryptionParams:
        """Raises: ValueError: empty source."""
        params = cls()
        params.source = _bytes(source, encoding)
        return params

    def new_kdf(self) -> dict[str, Any]:  # only ever used to read
        raise DecryptionError("DecryptionParams decrypt; encrypt with EncryptionParams")

    def master_key(self, kdf: dict[str, Any]) -> bytes:
        """The key of a file with record ``kdf``: the raw key as given, or derived from the text by the record.

        Raises:
            DecryptionError: a passphrase for a raw-key file, or a record out of bounds.
        """
        if self.key is not None:
            return self.key
        assert self.source is not None
        if kdf.get("alg") != ARGON2_ALG:
            raise DecryptionError("this file was encrypted with a key, not a string: DecryptionParams.from_key(key)")
        return Passphrase(self.source).master_key(kdf)

    def __repr__(self) -> str:
        return f"DecryptionParams(<secret>, from_{'key' if self.key is not None else 'string'})"
