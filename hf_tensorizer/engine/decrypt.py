"""Which decrypting transform a load uses: ours (per-block, header authenticated) or upstream tensorizer's."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from ..constants import KEY_ENV
from ..errors import DecryptionError, MissingKeyError, UsageError
from ..format.index import FileIndex

if TYPE_CHECKING:
    from ..crypto.keys import KeySpec


def open_transform(index: FileIndex, encryption: KeySpec | None, uri: str = "file") -> Callable[..., None]:
    """Authenticate the file's header with ``encryption`` and return the engine's in-place decrypting transform.

    Raises:
        MissingKeyError: the file is encrypted and no key was given or found in ``HF_TENSORIZER_KEY``.
        DecryptionError: wrong key or passphrase, a tampered header, or a key for a file that is not encrypted.
    """
    # imported here: plain loads never import the crypto code (or PyNaCl)
    from ..crypto import authenticate, make_transform
    from ..upstream.crypto import upstream_transform
    from ..upstream.format import UpstreamIndex

    if isinstance(index, UpstreamIndex):
        return upstream_transform(index, encryption, uri)
    keys, macs = authenticate(index, encryption, uri)
    return make_transform(index, keys, macs)


def choose_transform(
    index: FileIndex, encryption: KeySpec | Literal[False] | None, transform: Any, uri: str = "file"
) -> Any:
    """The transform a load runs: the caller's, a decrypting one, or none; never a silent downgrade.

    A key is *configured* when the caller passes one or ``HF_TENSORIZER_KEY`` is set. A configured key is
    never ignored: a file that is not encrypted is refused (a file whose encryption header was stripped
    would otherwise load its ciphertext as tensors). ``encryption=False`` says the file is meant to be plain
    and ignores the environment variable.

    Args:
        index: the file's (not yet trusted) index.
        encryption: a key or passphrase, ``None`` (``HF_TENSORIZER_KEY`` if set) or ``False`` (plain file).
        transform: the caller's own transform, or ``None``.
        uri: for messages.

    Returns:
        The transform to run (``None`` for a plain load).

    Raises:
        MissingKeyError: the file is encrypted and there is no key (or ``encryption=False``).
        DecryptionError: a configured key and a file that is not encrypted; a wrong key; a tampered header.
        UsageError: ``transform=`` together with encryption.
    """
    if encryption is False:
        if index.encrypted:
            raise MissingKeyError(f"{uri} is encrypted, but encryption=False said it is plain")
        return transform
    from_env = encryption is None and bool(os.environ.get(KEY_ENV, "").strip())
    if not (index.encrypted or encryption is not None or from_env):
        return transform
    if not index.encrypted and from_env:
        raise DecryptionError(
            f"{uri} is not encrypted, but {KEY_ENV} is set: refusing a file that may have had its encryption "
            f"stripped; pass encryption=False to load a plain file on purpose, or unset {KEY_ENV}"
        )
    if transform is not None:
        raise UsageError("transform= and encryption cannot be combined")
    # authenticates the whole header before any planning, filtering or tensor access
    return open_transform(index, encryption, uri)
