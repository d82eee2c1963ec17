"""Preamble and index: the front of every file, encoded and decoded without any I/O.

Layout (docs/format.md is the normative description)::

    [preamble: 128 bytes][index: JSON, index_length bytes][padding][tensor data ...]

The preamble fixes the index length and the data offset, so a reader gets everything it needs with one
small range request. Every offset and length in the index is validated against the file size and the
other entries before the engine may use it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..constants import MAX_INDEX_BYTES
from ..errors import (
    FormatError,
    HeaderTooLargeError,
    IndexDigestError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from .dtypes import dtype_from_name, element_size

MAGIC = b"HFTZ\x89\r\n\x1a"  # PNG-style: catches text-mode and truncated transfers
VERSION = 1
PREAMBLE_SIZE = 128
_PREAMBLE = struct.Struct("<8sIIQQQQQ32s32s8s")
assert _PREAMBLE.size == PREAMBLE_SIZE

FEATURE_ENCRYPTED = 1 << 0  # required: tensor data is sealed; see docs/security.md
KNOWN_REQUIRED_FEATURES = FEATURE_ENCRYPTED
KNOWN_OPTIONAL_FEATURES = 0
DIGESTS = {"crc32": 8, "sha256": 64, "none": 0}  # hex length of one block digest
U64_MAX = (1 << 64) - 1
I64_MAX = (1 << 63) - 1


class TensorKind(str, enum.Enum):
    """What a tensor was in its module: restored as such by ``load_into_module``."""

    PARAMETER = "parameter"
    BUFFER = "buffer"
    PLAIN = "plain"


@dataclass(frozen=True)
class Preamble:
    """The fixed 128 bytes at offset 0."""

    version: int
    required_features: int
    optional_features: int
    index_length: int
    data_offset: int
    file_size: int
    index_sha256: bytes
    auth_tag: bytes = b"\0" * 32

    @property
    def encrypted(self) -> bool:
        return bool(self.required_features & FEATURE_ENCRYPTED)

    def encode(self) -> bytes:
        return _PREAMBLE.pack(
            MAGIC, self.version, PREAMBLE_SIZE, self.required_features, self.optional_features,
            self.index_length, self.data_offset, self.file_size, self.index_sha256, self.auth_tag, b"\0" * 8,
        )  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in the index.

    ``offset`` is absolute in the file. An alias entry (``alias`` set) has no data of its own: it is the
    same tensor as the entry it names (tied weights), and loads as the very same object.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: TensorKind = TensorKind.PLAIN
    offset: int = 0
    length: int = 0
    digests: tuple[str, ...] = ()
    alias: str | None = None
    crypt: Mapping[str, Any] | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict[str, Any]:
        from .dtypes import dtype_name

        out: dict[str, Any] = {"name": self.name, "dtype": dtype_name(self.dtype), "shape": list(self.shape)}
        out["kind"] = self.kind.value
        if self.alias is not None:
            out["alias"] = self.alias
            return out
        out["offset"] = self.offset
        out["length"] = self.length
        out["digests"] = list(self.digests)
        if self.crypt is not None:
            out["crypt"] = dict(self.crypt)
        return out


@dataclass
class FileIndex:
    """Everything the front of a file says: preamble fields plus the decoded index."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    alignment: int = 4096
    block_size: int = 16 << 20
    digest: str = "crc32"
    data_offset: int = 0
    file_size: int = 0
    required_features: int = 0
    optional_features: int = 0
    encryption: dict[str, Any] | None = None
    preamble: Preamble | None = None
    raw_index: bytes = b""

    @property
    def data_entries(self) -> list[TensorEntry]:
        """Entries that own bytes, in file order."""
        return sorted((e for e in self.tensors.values() if e.alias is None), key=lambda e: e.offset)

    @property
    def data_bytes(self) -> int:
        return sum(e.length for e in self.tensors.values() if e.alias is None)

    @property
    def encrypted(self) -> bool:
        return bool(self.required_features & FEATURE_ENCRYPTED)


def encode_index(index: FileIndex) -> bytes:
    """The JSON bytes of an index (compact, UTF-8, stable key order)."""
    doc: dict[str, Any] = {
        "alignment": index.alignment,
        "block_size": index.block_size,
        "digest": index.digest,
        "metadata": dict(index.metadata),
        "tensors": [e.to_json() for e in index.tensors.values()],
    }
    if index.encryption is not None:
        doc["encryption"] = index.encryption
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_header(index: FileIndex, auth_tag: bytes = b"\0" * 32) -> bytes:
    """Preamble + index bytes, padded with spaces up to ``index.data_offset``.

    ``index.data_offset`` and ``index.file_size`` must already be final (see ``engine.layout``).
    """
    raw = encode_index(index)
    if PREAMBLE_SIZE + len(raw) > index.data_offset:
        raise FormatError(f"index of {len(raw)} bytes does not fit before data offset {index.data_offset}")
    pre = Preamble(
        version=VERSION,
        required_features=index.required_features,
        optional_features=index.optional_features,
        index_length=len(raw),
        data_offset=index.data_offset,
        file_size=index.file_size,
        index_sha256=hashlib.sha256(raw).digest(),
        auth_tag=auth_tag,
    )
    return pre.encode() + raw + b" " * (index.data_offset - PREAMBLE_SIZE - len(raw))


def decode_preamble(data: bytes, *, file_size: int | None = None, max_index_bytes: int = MAX_INDEX_BYTES) -> Preamble:
    """Parse and validate the first 128 bytes.

    Args:
        data: at least the first ``PREAMBLE_SIZE`` bytes of the file.
        file_size: the real size of the file when known; checked against the recorded size.
        max_index_bytes: cap on the index length (a hostile file must not make us allocate gigabytes).

    Raises:
        FormatError: wrong magic or inconsistent fields.
        UnsupportedVersionError: newer version or unknown required feature.
        TruncatedFileError: the file is shorter than the preamble says.
        HeaderTooLargeError: the index is larger than the cap.
    """
    if len(data) < PREAMBLE_SIZE:
        head = bytes(data[: len(MAGIC)])
        if MAGIC.startswith(head):
            raise TruncatedFileError(f"file is {len(data)} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
        raise FormatError("not an hf_tensorizer file (bad magic)")
    magic, version, psize, req, opt, ilen, doff, fsize, sha, tag, _ = _PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        if bytes(data[:5]) == b"|TZR|":
            raise FormatError("this is an upstream CoreWeave tensorizer file; open it with hf_tensorizer.compat")
        raise FormatError("not an hf_tensorizer file (bad magic)")
    if version == 0 or version > VERSION:
        raise UnsupportedVersionError(f"format version {version} is not supported (this reader knows 1..{VERSION})")
    if psize != PREAMBLE_SIZE:
        raise FormatError(f"preamble size {psize} is invalid for version {version}")
    unknown = req & ~KNOWN_REQUIRED_FEATURES
    if unknown:
        raise UnsupportedVersionError(f"file needs unknown required features 0x{unknown:x}; upgrade hf_tensorizer")
    if ilen > max_index_bytes:
        raise HeaderTooLargeError(f"index of {ilen} bytes exceeds the cap of {max_index_bytes} bytes")
    if doff < PREAMBLE_SIZE + ilen:
        raise FormatError(f"data offset {doff} overlaps the index (ends at {PREAMBLE_SIZE + ilen})")
    if fsize < doff:
        raise FormatError(f"recorded file size {fsize} is smaller than the data offset {doff}")
    if file_size is not None and file_size != fsize:
        if file_size < fsize:
            raise TruncatedFileError(f"file is {file_size} bytes but its preamble records {fsize}: truncated")
        raise FormatError(f"file is {file_size} bytes but its preamble records {fsize}: trailing data")
    return Preamble(version, req, opt, ilen, doff, fsize, sha, tag)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise FormatError(msg)


def _u64(v: Any, what: str, *args: object) -> int:
    """``v`` when it is an unsigned 64-bit integer; else a FormatError naming ``what % args`` (formatted only then:
    this runs for every dimension of every tensor of an index)."""
    if type(v) is not int or not 0 <= v <= U64_MAX:
        raise FormatError(f"{what % args if args else what} must be an unsigned 64-bit integer, got {v!r}")
    return v


def decode_index(preamble: Preamble, raw: bytes) -> FileIndex:
    """Parse and validate the index bytes that follow the preamble.

    Raises:
        IndexDigestError: the bytes do not match the preamble's SHA-256.
        FormatError: malformed JSON or an entry that is inconsistent (see docs/format.md, "Validation").
        UnknownDtypeError: a dtype name this reader does not know.
    """
    if len(raw) < preamble.index_length:
        raise TruncatedFileError(f"index is {preamble.index_length} bytes but only {len(raw)} could be read")
    raw = bytes(raw[: preamble.index_length])
    if hashlib.sha256(raw).digest() != preamble.index_sha256:
        raise IndexDigestError("index bytes do not match the SHA-256 in the preamble (corrupt or edited header)")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also over-long int literals
        raise FormatError(f"index is not valid UTF-8 JSON: {exc}") from None
    _need(isinstance(doc, dict), "index must be a JSON object")
    alignment = _u64(doc.get("alignment"), "alignment")
    _need(alignment >= 1 and alignment & (alignment - 1) == 0, f"alignment {alignment} must be a power of two")
    block_size = _u64(doc.get("block_size"), "block_size")
    _need(block_size >= 4096 and block_size % 64 == 0, f"block_size {block_size} must be >= 4096, multiple of 64")
    digest = doc.get("digest")
    _need(isinstance(digest, str) and digest in DIGESTS, f"unknown digest algorithm {digest!r}")
    metadata = doc.get("metadata", {})
    _need(isinstance(metadata, dict), "metadata must be a JSON object")
    _need(all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()), "metadata must map str->str")
    encryption = doc.get("encryption")
    _need(encryption is None or isinstance(encryption, dict), "encryption must be a JSON object")
    _need(
        (encryption is not None) == preamble.encrypted,
        "encryption section and the encrypted feature flag disagree",
    )
    items = doc.get("tensors")
    _need(isinstance(items, list), "tensors must be a JSON array")

    tensors: dict[str, TensorEntry] = {}
    bounds = (preamble.data_offset, preamble.file_size, preamble.encrypted)  # looked up once, not per entry
    for i, item in enumerate(items):
        entry = _decode_entry(i, item, digest, block_size, bounds)
        _need(entry.name not in tensors, f"duplicate tensor name {entry.name!r}")
        tensors[entry.name] = entry
    _check_aliases(tensors)
    _check_layout(tensors, preamble)
    return FileIndex(
        tensors=tensors,
        metadata=dict(metadata),
        alignment=alignment,
        block_size=block_size,
        digest=digest,
        data_offset=preamble.data_offset,
        file_size=preamble.file_size,
        required_features=preamble.required_features,
        optional_features=preamble.optional_features,
        encryption=encryption,
        preamble=preamble,
        raw_index=raw,
    )


_KINDS = {k.value: k for k in TensorKind}


def _decode_entry(i: int, item: Any, digest: str, block_size: int, bounds: tuple[int, int, bool]) -> TensorEntry:
    """One validated index entry; ``bounds``: the data offset, the file size and whether the file is encrypted."""
    # Checks are written ``if not ok: raise`` so the messages are only formatted for a bad entry, and the entry is
    # built without the frozen dataclass's per-field ``object.__setattr__``: an index has one entry per tensor and
    # this runs on every open (decoding 144 entries was 1.6 of a warm 0.6 GB load call's 3.9 ms; now about 1 ms).
    if not isinstance(item, dict):
        raise FormatError(f"tensor entry {i} must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or name == "":
        raise FormatError(f"tensor entry {i} has no valid name")
    dtype = dtype_from_name(item.get("dtype"))
    shape = item.get("shape")
    if not isinstance(shape, list):
        raise FormatError(f"tensor {name!r}: shape must be a list")
    if len(shape) > 64:  # before any product: a hostile shape of a million huge dimensions costs nothing
        raise FormatError(f"tensor {name!r}: {len(shape)} dimensions is more than the 64 allowed")
    numel = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= U64_MAX:
            _u64(d, "tensor %r: dimension", name)  # raises
        numel *= d
    dims = tuple(shape)
    # torch's contiguous strides are products of max(dim, 1): they must fit in int64, even if numel is 0
    span = numel
    if not numel:
        span = 1
        for d in dims:
            span *= max(d, 1)
    if span > I64_MAX:
        raise FormatError(f"tensor {name!r}: shape {list(dims)} is too large for a tensor")
    kind_name = item.get("kind", "plain")
    kind = _KINDS.get(kind_name) if type(kind_name) is str else None
    if kind is None:
        try:  # anything TensorKind itself accepts (a TensorKind, a str subclass) is still accepted
            kind = TensorKind(kind_name)
        except (ValueError, TypeError):
            raise FormatError(f"tensor {name!r}: unknown kind {kind_name!r}") from None
    if "alias" in item:
        alias = item["alias"]
        if not isinstance(alias, str):
            raise FormatError(f"tensor {name!r}: alias must be a tensor name")
        return _entry(name, dtype, dims, kind, 0, 0, (), alias, None)
    data_offset, file_size, encrypted = bounds
    offset = item.get("offset")
    if type(offset) is not int or not 0 <= offset <= U64_MAX:
        _u64(offset, "tensor %r: offset", name)  # raises
    length = item.get("length")
    if type(length) is not int or not 0 <= length <= U64_MAX:
        _u64(length, "tensor %r: length", name)  # raises
    if numel * element_size(dtype) != length:
        raise FormatError(f"tensor {name!r}: length {length} does not match {list(dims)} of {dtype}")
    if offset < data_offset:
        raise FormatError(f"tensor {name!r}: offset {offset} lies before the data section ({data_offset})")
    if offset + length > file_size:
        raise FormatError(f"tensor {name!r}: data [{offset}, {offset + length}) runs past the file end")
    digests = item.get("digests", [])
    if not isinstance(digests, list):
        raise FormatError(f"tensor {name!r}: digests must be a list")
    if digest != "none":
        blocks = -(-length // block_size)
        if len(digests) != blocks:
            raise FormatError(f"tensor {name!r}: {len(digests)} digests for {blocks} blocks")
        width = DIGESTS[digest]
        for d in digests:
            if type(d) is not str or len(d) != width or d.strip(_HEX):
                raise FormatError(f"tensor {name!r}: malformed {digest} digest")
    crypt = item.get("crypt")
    if crypt is not None and not isinstance(crypt, dict):
        raise FormatError(f"tensor {name!r}: crypt must be a JSON object")
    if (crypt is not None) != encrypted:
        raise FormatError(f"tensor {name!r}: per-tensor crypt metadata and the file flag disagree")
    return _entry(name, dtype, dims, kind, offset, length, tuple(digests), None, crypt)


_new_object = object.__new__
_set_attribute = object.__setattr__


def _entry(name: str, dtype: torch.dtype, shape: tuple[int, ...], kind: TensorKind, offset: int, length: int,
           digests: tuple[str, ...], alias: str | None, crypt: Mapping[str, Any] | None) -> TensorEntry:  # fmt: skip
    """A :class:`TensorEntry` of already validated fields, built with one attribute write instead of the frozen
    dataclass's nine (the same object: equal, hashable, ``dataclasses.replace`` works)."""
    e = _new_object(TensorEntry)
    _set_attribute(e, "__dict__", {"name": name, "dtype": dtype, "shape": shape, "kind": kind, "offset": offset,
                                   "length": length, "digests": digests, "alias": alias, "crypt": crypt})  # fmt: skip
    return e


_HEX = "0123456789abcdef"


def _check_aliases(tensors: dict[str, TensorEntry]) -> None:
    for e in tensors.values():
        if e.alias is None:
            continue
        target = tensors.get(e.alias)
        _need(target is not None, f"tensor {e.name!r} aliases unknown tensor {e.alias!r}")
        assert target is not None
        _need(target.alias is None, f"tensor {e.name!r} aliases another alias {e.alias!r}")
        _need(
            target.dtype == e.dtype and target.shape == e.shape,
            f"tensor {e.name!r} aliases {e.alias!r} with a different dtype or shape",
        )


def _check_layout(tensors: dict[str, TensorEntry], pre: Preamble) -> None:
    data = [t for t in tensors.values() if t.alias is None and t.length]
    end = pre.data_offset
    for e in data:  # writers store tensors in offset order: checked as they come, sorted only when they are not
        if e.offset < end:
            break
        end = e.offset + e.length
    else:
        return
    end = pre.data_offset
    prev = None
    for e in sorted(data, key=lambda t: t.offset):
        _need(e.offset >= end, f"tensor {e.name!r} at {e.offset} overlaps tensor {prev!r} (ends at {end})")
        end, prev = e.offset + e.length, e.name


def whole_block(tensor_offset: int, length: int, tensor_length: int, block_size: int) -> int | None:
    """The number of the digest/encryption block that the bytes ``[tensor_offset, tensor_offset + length)`` of a
    tensor ``tensor_length`` bytes long cover exactly, or None when they cover a partial block or several."""
    if tensor_offset % block_size:
        return None
    expected = min(block_size, tensor_length - tensor_offset)
    return tensor_offset // block_size if length == expected else None
