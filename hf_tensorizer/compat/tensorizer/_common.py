"""What :mod:`.serialization` and :mod:`._deserializer` share: upstream's constants, enums and error names, and
how upstream's arguments (file objects, streams, ``DecryptionParams``) become our engine's."""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...crypto.keys import EncryptionKey, Passphrase
from ...errors import DecryptionError, EncryptionError, MissingKeyError
from ...errors import HashMismatchError as OurHashMismatch
from ...format.index import TensorKind
from ...upstream.format import UpstreamIndex
from ._keys import DecryptionParams

TENSORIZER_VERSION = 5
LONG_TENSOR_TENSORIZER_VERSION = 5
META_TENSOR_TENSORIZER_VERSION = 4
ENCRYPTION_TENSORIZER_VERSION = 3
OPAQUE_TENSORIZER_VERSION = 2
NON_OPAQUE_TENSORIZER_VERSION = 1
#: metadata key holding the meta tensors of a file written here: ``[[name, dtype, shape, kind], ...]``
META_KEY = "tensorizer.meta_tensors"

FilterFuncType = Callable[[str | Sequence[str | int]], bool]


class TensorType(enum.IntEnum):
    """What a tensor was in its module: upstream's numbering."""

    PARAM = 0
    BUFFER = 1
    STATE_DICT = 2


KIND_OF_TYPE = {TensorType.PARAM: TensorKind.PARAMETER, TensorType.BUFFER: TensorKind.BUFFER,
          TensorType.STATE_DICT: TensorKind.PLAIN}  # fmt: skip
TYPE_OF_KIND = {v: k for k, v in KIND_OF_TYPE.items()}


class HashType(enum.IntEnum):
    """Upstream's per-tensor hash kinds (files written here use our block digests instead)."""

    CRC32 = 0
    SHA256 = 1


@dataclasses.dataclass(order=True)
class TensorHash:
    """A per-tensor hash of an upstream file (upstream's record type)."""

    type: HashType
    hash: bytes


class CryptographyError(DecryptionError):
    """Encryption or decryption failed (upstream's name; also our ``DecryptionError``)."""


class HashMismatchError(OurHashMismatch):
    """Stored bytes do not match their hash (upstream's name; also our ``HashMismatchError``)."""


class FileFeatureFlags(enum.IntFlag):
    encrypted = enum.auto()
    versioned_headers = enum.auto()


def dest_of(file_obj: Any) -> tuple[Any, dict[str, Any]]:
    """Where a ``TensorSerializer`` writes, and the sink options (``stream_io.open_stream`` results carry a URI)."""
    from .stream_io import RemoteStream

    if isinstance(file_obj, RemoteStream):
        return file_obj.uri, dict(file_obj.options)
    if isinstance(file_obj, int) and not isinstance(file_obj, bool):
        return os.fdopen(file_obj, "wb", closefd=False), {}
    if isinstance(file_obj, bytes):
        return os.fsdecode(file_obj), {}
    return file_obj, {}


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def source_of(file_obj: Any) -> tuple[Any, dict[str, Any]]:
    from .stream_io import RemoteStream

    if isinstance(file_obj, RemoteStream):
        return file_obj.uri, dict(file_obj.options)
    if isinstance(file_obj, int) and not isinstance(file_obj, bool):
        return os.fdopen(os.dup(file_obj), "rb"), {}
    if isinstance(file_obj, bytes):
        return os.fsdecode(file_obj), {}
    return file_obj, {}


def key_for(index: Any, encryption: Any) -> Any:
    """``encryption`` as the engine takes it for this file (upstream files take our key classes)."""
    if encryption is None:
        return False  # upstream: no key given means none (our engine would look at HF_TENSORIZER_KEY)
    if isinstance(index, UpstreamIndex) and isinstance(encryption, DecryptionParams):
        return EncryptionKey(encryption.key) if encryption.key is not None else Passphrase(encryption.source or b"")
    return encryption


class Translated:
    """Our crypto and hash errors as upstream's names (still our classes through inheritance)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, (DecryptionError, MissingKeyError, EncryptionError)) and not isinstance(
            exc, CryptographyError
        ):
            raise CryptographyError(str(exc)) from exc
        if isinstance(exc, OurHashMismatch) and not isinstance(exc, HashMismatchError):
            raise HashMismatchError(str(exc), tensors=exc.tensors) from exc
        return False
