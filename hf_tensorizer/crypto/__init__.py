"""Encryption and authentication of hf_tensorizer files (design and threat model: docs/security.md).

Writing::

    key = EncryptionKey.generate()          # or EncryptionKey.from_file(...), Passphrase("...")
    with TensorSerializer("model.tensors", encryption=key) as s:
        s.write_module(model)

Reading::

    TensorDeserializer("model.tensors", encryption=key)   # or set HF_TENSORIZER_KEY
"""

from __future__ import annotations

from typing import Any

from ..constants import KEY_ENV
from ..errors import DecryptionError, MissingKeyError
from ..format.index import FileIndex
from .keys import EncryptionKey, KeySource, KeySpec, Passphrase, as_key_source, key_or_env
from .seal import SCHEME, BlockCipher, FileKeys, FileSealer, make_transform, open_section, verify_header

__all__ = [
    "KEY_ENV",
    "SCHEME",
    "BlockCipher",
    "EncryptionKey",
    "FileKeys",
    "FileSealer",
    "KeySource",
    "KeySpec",
    "Passphrase",
    "authenticate",
    "make_transform",
]


def authenticate(index: FileIndex, encryption: KeySpec | None, uri: str = "file") -> tuple[FileKeys, dict[str, Any]]:
    """Check that ``encryption`` opens the file and that its header is authentic.

    Args:
        index: as returned by ``read_index`` (not yet trusted).
        encryption: key or passphrase; ``None`` falls back to ``HF_TENSORIZER_KEY``.
        uri: for messages.

    Returns:
        The file's keys and each tensor's block MACs (name -> list of 16-byte MACs).

    Raises:
        MissingKeyError: the file is encrypted and no key was given or found in the environment.
        DecryptionError: wrong key or passphrase, or the header was modified; also when a key is given
            for a file that is not encrypted (a plain file swapped in for an encrypted one).
    """
    if not index.encrypted:
        if encryption is not None:
            raise DecryptionError(f"{uri} is not encrypted, but a key was given: refusing an unauthenticated file")
        raise MissingKeyError(f"{uri} is not encrypted")
    encryption = key_or_env(
        encryption, f"{uri} is encrypted: pass encryption=EncryptionKey(...)/Passphrase(...) or set {KEY_ENV}"
    )
    source = as_key_source(encryption)
    assert index.encryption is not None  # decode_index ties the section to the feature flag
    keys = open_section(index.encryption, source, uri)
    macs = verify_header(index, keys, uri)
    return keys, macs
