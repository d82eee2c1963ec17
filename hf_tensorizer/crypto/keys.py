"""Keys: random 32-byte keys (generated, in key files, in the environment) and Argon2id passphrases.

A file never stores a key. It stores a *key derivation record* (``kdf`` in its ``encryption`` section):
``{"alg": "none"}`` for a raw key, or ``{"alg": "argon2id13", "opslimit", "memlimit", "salt"}`` for a
passphrase. Both kinds of :class:`KeySource` turn that record into the 32-byte master key.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from typing import Any, Protocol, runtime_checkable

from ..constants import KEY_ENV
from ..errors import DecryptionError, EncryptionError, MissingKeyError, UsageError

KEY_BYTES = 32
PWHASH_SALT_BYTES = 16
ARGON2_ALG = "argon2id13"
# Caps on what a file may ask of the reader: the kdf record is read before it can be authenticated, so
# a hostile file must not make the reader burn minutes or gigabytes. The writer enforces the same caps.
MAX_OPSLIMIT = 4  # libsodium OPSLIMIT_SENSITIVE, the highest preset of libsodium and of upstream tensorizer
MAX_MEMLIMIT = 1 << 30  # MEMLIMIT_SENSITIVE (1 GiB): the worst a file can ask is ~4 passes over 1 GiB, a few s


def nacl_module() -> Any:
    """PyNaCl, imported on first use (an optional extra); a clear error when it is not installed."""
    try:
        import nacl.bindings
        import nacl.pwhash.argon2id
        import nacl.utils
    except ImportError as exc:  # pragma: no cover - pynacl is a declared extra
        raise EncryptionError("encryption needs PyNaCl: pip install 'hf_tensorizer[crypto]'") from exc
    return nacl


@runtime_checkable
class KeySource(Protocol):
    """Anything that yields a master key from a file's kdf record."""

    def new_kdf(self) -> dict[str, Any]:
        """A fresh kdf record for a new file (random salt where the method uses one)."""

    def master_key(self, kdf: dict[str, Any]) -> bytes:
        """The 32-byte master key for ``kdf``.

        Raises:
            DecryptionError: the record does not fit this kind of key, or is out of bounds.
        """


class EncryptionKey:
    """A random 32-byte secret key. Its ``repr`` never shows the bytes.

    Args:
        raw: exactly 32 bytes.

    Raises:
        UsageError: ``raw`` is not 32 bytes.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != KEY_BYTES:
            raise UsageError(f"an encryption key is exactly {KEY_BYTES} bytes")
        self._raw = bytes(raw)

    @classmethod
    def generate(cls) -> EncryptionKey:
        """A new key from the OS CSPRNG (libsodium ``randombytes``)."""
        return cls(nacl_module().utils.random(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str) -> EncryptionKey:
        """Parse a key written as base64 (standard or URL-safe, 44 chars) or hex (64 chars).

        Raises:
            UsageError: the text is not a 32-byte key in either encoding.
        """
        t = text.strip()
        raw: bytes | None = None
        if len(t) == 2 * KEY_BYTES:
            try:
                raw = bytes.fromhex(t)
            except ValueError:
                raw = None
        if raw is None:
            try:
                raw = base64.b64decode(t.replace("-", "+").replace("_", "/"), validate=True)
            except (binascii.Error, ValueError):
                raw = None
        if raw is None or len(raw) != KEY_BYTES:
            raise UsageError(f"not a {KEY_BYTES}-byte key (expected 44 base64 or 64 hex characters)")
        return cls(raw)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> EncryptionKey:
        """Read a key file written by :meth:`save` or ``hf-tensorizer keygen``.

        Raises:
            MissingKeyError: the file does not exist or cannot be read.
            UsageError: it does not hold a key.
        """
        try:
            with open(path, encoding="ascii") as f:
                text = f.read(4096)
        except (OSError, UnicodeDecodeError) as exc:
            raise MissingKeyError(f"cannot read key file {os.fspath(path)}: {exc}") from None
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if len(lines) != 1:
            raise UsageError(f"key file {os.fspath(path)} must hold exactly one key line")
        return cls.from_text(lines[0])

    @classmethod
    def from_env(cls, name: str = KEY_ENV) -> EncryptionKey:
        """The key in environment variable ``name`` (default ``HF_TENSORIZER_KEY``).

        Raises:
            MissingKeyError: the variable is unset or empty.
            UsageError: it does not hold a key.
        """
        value = os.environ.get(name, "").strip()
        if not value:
            raise MissingKeyError(f"environment variable {name} is not set")
        return cls.from_text(value)

    def to_text(self) -> str:
        """Standard base64, the form key files and ``HF_TENSORIZER_KEY`` use."""
        return base64.b64encode(self._raw).decode("ascii")

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key to ``path``, readable by the owner only (mode 0600), never over an existing file
        unless ``overwrite``.

        Raises:
            UsageError: the file exists and ``overwrite`` is false.
        """
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, stat.S_IRUSR | stat.S_IWUSR)
        except FileExistsError:
            raise UsageError(f"{os.fspath(path)} exists; refusing to overwrite a key file") from None
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.fchmod(f.fileno(), stat.S_IRUSR | stat.S_IWUSR)
            f.write("# hf-tensorizer encryption key: keep secret, keep a backup (data is lost without it)\n")
            f.write(self.to_text() + "\n")

    @property
    def raw(self) -> bytes:
        """The 32 key bytes."""
        return self._raw

    def new_kdf(self) -> dict[str, Any]:
        return {"alg": "none"}

    def master_key(self, kdf: dict[str, Any]) -> bytes:
        if kdf.get("alg") != "none":
            raise DecryptionError(
                f"the file was encrypted with a passphrase ({kdf.get('alg')!r}); pass a Passphrase, not a key"
            )
        return self._raw

    def __repr__(self) -> str:
        return "EncryptionKey(<secret>)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncryptionKey):
            return NotImplemented
        return bool(nacl_module().bindings.sodium_memcmp(self._raw, other._raw))

    __hash__ = None  # type: ignore[assignment]


class Passphrase:
    """A passphrase stretched with Argon2id (libsodium ``crypto_pwhash``) into the master key.

    The salt and cost parameters are stored in the file; the derived key never is. Reading uses the
    parameters from the file (bounded by ``MAX_OPSLIMIT``/``MAX_MEMLIMIT``).

    Args:
        passphrase: text (UTF-8 encoded) or bytes; must not be empty.
        opslimit: Argon2id passes for new files (default libsodium's MODERATE, 3).
        memlimit: Argon2id memory in bytes for new files (default MODERATE, 256 MiB).

    Raises:
        UsageError: empty passphrase or parameters outside libsodium's or our bounds.
    """

    __slots__ = ("_pw", "memlimit", "opslimit")

    def __init__(self, passphrase: str | bytes, *, opslimit: int | None = None, memlimit: int | None = None) -> None:
        argon = nacl_module().pwhash.argon2id
        pw = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
        if not pw:
            raise UsageError("the passphrase is empty")
        self._pw = pw
        self.opslimit = argon.OPSLIMIT_MODERATE if opslimit is None else opslimit
        self.memlimit = argon.MEMLIMIT_MODERATE if memlimit is None else memlimit
        _check_argon_params(self.opslimit, self.memlimit, UsageError)

    @classmethod
    def from_env(cls, name: str) -> Passphrase:
        """The passphrase in environment variable ``name``.

        Raises:
            MissingKeyError: unset or empty.
        """
        value = os.environ.get(name, "")
        if not value:
            raise MissingKeyError(f"environment variable {name} is not set")
        return cls(value)

    def new_kdf(self) -> dict[str, Any]:
        salt = nacl_module().utils.random(PWHASH_SALT_BYTES)
        return {"alg": ARGON2_ALG, "opslimit": self.opslimit, "memlimit": self.memlimit, "salt": salt.hex()}

    def master_key(self, kdf: dict[str, Any]) -> bytes:
        alg = kdf.get("alg")
        if alg == "none":
            raise DecryptionError("the file was encrypted with a key, not a passphrase; pass an EncryptionKey")
        if alg != ARGON2_ALG:
            raise DecryptionError(f"unknown key derivation {alg!r} in the file")
        ops, mem, salt_hex = kdf.get("opslimit"), kdf.get("memlimit"), kdf.get("salt")
        if type(ops) is not int or type(mem) is not int:
            raise DecryptionError("malformed Argon2id parameters in the file")
        _check_argon_params(ops, mem, DecryptionError)
        try:
            salt = bytes.fromhex(salt_hex) if isinstance(salt_hex, str) else b""
        except ValueError:
            salt = b""
        if len(salt) != PWHASH_SALT_BYTES:
            raise DecryptionError("malformed Argon2id salt in the file")
        return bytes(nacl_module().pwhash.argon2id.kdf(KEY_BYTES, self._pw, salt, opslimit=ops, memlimit=mem))

    def __repr__(self) -> str:
        return f"Passphrase(<secret>, opslimit={self.opslimit}, memlimit={self.memlimit})"


def _check_argon_params(ops: int, mem: int, error: type[Exception]) -> None:
    argon = nacl_module().pwhash.argon2id
    if not argon.OPSLIMIT_MIN <= ops <= MAX_OPSLIMIT:
        raise error(f"Argon2id opslimit {ops} outside [{argon.OPSLIMIT_MIN}, {MAX_OPSLIMIT}]")
    if not argon.MEMLIMIT_MIN <= mem <= MAX_MEMLIMIT:
        raise error(f"Argon2id memlimit {mem} outside [{argon.MEMLIMIT_MIN}, {MAX_MEMLIMIT}]")


KeySpec = EncryptionKey | Passphrase | bytes | KeySource


def as_key_source(spec: KeySpec) -> KeySource:
    """Normalize what users pass as ``encryption=``: a key, a passphrase, or 32 raw bytes.

    Raises:
        UsageError: anything else (a ``str`` is refused: wrap it in ``Passphrase`` or ``EncryptionKey.from_text``).
    """
    if isinstance(spec, (bytes, bytearray)):
        return EncryptionKey(bytes(spec))
    if isinstance(spec, str):
        raise UsageError("pass Passphrase('...') or EncryptionKey.from_text('...'), not a bare string")
    if isinstance(spec, KeySource):
        return spec
    raise UsageError(f"encryption= must be an EncryptionKey, a Passphrase or 32 bytes, not {type(spec).__name__}")


def key_or_env(encryption: KeySpec | None, missing: str) -> KeySpec:
    """``encryption``, or else the key configured in ``HF_TENSORIZER_KEY``.

    Args:
        encryption: a key or passphrase the caller gave, or ``None``.
        missing: the message of the error when there is neither (say how to pass a key where it is raised).

    Raises:
        MissingKeyError: no key given and none in the environment.
        UsageError: the environment variable does not hold a key.
    """
    if encryption is not None:
        return encryption
    try:
        return EncryptionKey.from_env(KEY_ENV)
    except MissingKeyError:
        raise MissingKeyError(missing) from None
