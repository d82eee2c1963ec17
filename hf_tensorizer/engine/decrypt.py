"""Which decrypting transform a load uses: ours (per-block, header authenticated) or upstream tensorizer's."""

from __future__ import annotations

from collections.abc import Callable

from ..crypto import authenticate, make_transform
from ..crypto.keys import KeySpec
from ..format.index import FileIndex
from ..upstream.crypto import upstream_transform
from ..upstream.format import UpstreamIndex


def open_transform(index: FileIndex, encryption: KeySpec | None, uri: str = "file") -> Callable[..., None]:
    """Authenticate the file's header with ``encryption`` and return the engine's in-place decrypting transform.

    Raises:
        MissingKeyError: the file is encrypted and no key was given or found in ``HF_TENSORIZER_KEY``.
        DecryptionError: wrong key or passphrase, a tampered header, or a key for a file that is not encrypted.
    """
    if isinstance(index, UpstreamIndex):
        return upstream_transform(index, encryption, uri)
    keys, macs = authenticate(index, encryption, uri)
    return make_transform(index, keys, macs)
