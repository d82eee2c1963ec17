"""Upstream tensorizer files, the format facts: bytes -> validated index, no I/O (format versions 1-5).

Layout (all integers little-endian, no alignment anywhere)::

    |TZR| [file header: I version, 32s flags, Q tensor_size, 8x, Q tensor_count]
          [Q metadata length][metadata: tensor_count index entries, then zero padding]
          per tensor: [tensor header][data] ... [Q 0 terminator]

The index entries give name, kind, dtype, shape and absolute header/data offsets; each per-tensor
header repeats them and adds the hashes and, for encrypted files, the crypt info (nonce and one MAC
per chunk). Everything here is validated against the file size before the engine may use it, and
each problem raises a typed :class:`~hf_tensorizer.errors.FormatError`. See docs/compat.md.

:func:`decode_upstream` is a generator in the sans-I/O style: it yields the byte ranges it needs next and is
sent their bytes (``hf_tensorizer.engine.header`` drives it over a Source), so parsing stays pure.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..constants import MAX_INDEX_BYTES
from ..errors import (
    FormatError,
    HeaderTooLargeError,
    TruncatedFileError,
    UnknownDtypeError,
    UnsupportedVersionError,
)
from ..format.dtypes import DTYPES
from ..format.index import FEATURE_ENCRYPTED, FileIndex, TensorEntry, TensorKind

UPSTREAM_MAGIC = b"|TZR|"
_FILE_HEADER = struct.Struct("<I32sQ8xQ")  # version, feature flags, tensor_size, unused, tensor_count
_Q = struct.Struct("<Q")
HEADER_END = len(UPSTREAM_MAGIC) + _FILE_HEADER.size + _Q.size  # first byte of the metadata block (73)
MAX_VERSION = 5
FLAG_ENCRYPTED = 1 << 0
FLAG_VERSIONED_ENTRIES = 1 << 1  # entries carry an entry version (needed for u64 dims); version >= 5
CRYPT_SCHEME = "tensorizer/xsalsa20-parallel"
MAX_TENSOR_HEADER = 64 << 20  # a header holds one 16-byte MAC per chunk: 64 MiB covers 8 TiB at 2 MiB
MAX_META_BYTES = 8 << 30  # meta tensors load as zeros: cap what a hostile header can make us allocate
MAX_CHUNK_SIZE = 1 << 30
MAX_BLOCK_SIZE = 256 << 20  # lcm of differing chunk sizes beyond this is refused
_MIN_ENTRY = 2 + 1 + 1 + 1 + 1 + 24  # name_len, name >= 1, type, dtype_len, ndim, three offsets
_HEADER_GAP = 64 << 10  # per-tensor headers closer than this are fetched in one read
_HEADER_SPAN = 4 << 20

_NUMPY_DTYPES = {
    "<f8": torch.float64, "<f4": torch.float32, "<f2": torch.float16,
    "|i1": torch.int8, "<i2": torch.int16, "<i4": torch.int32, "<i8": torch.int64,
    "|u1": torch.uint8, "<u2": torch.uint16, "<u4": torch.uint32, "<u8": torch.uint64,
    "|b1": torch.bool, "<c8": torch.complex64, "<c16": torch.complex128,
}  # fmt: skip
_KINDS = {0: TensorKind.PARAMETER, 1: TensorKind.BUFFER, 2: TensorKind.PLAIN}


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise FormatError(msg)


@dataclass(frozen=True)
class UpstreamTensor:
    """What a per-tensor header adds to its index entry."""

    header_offset: int
    module_index: int
    hash_prefix: bytes  # header bytes as hashed upstream: hash values zeroed, crypt info cut out
    crc32: int | None = None
    sha256: bytes | None = None
    raw_name: bytes = b""  # the name as stored: a structured one (``\x1e`` + JSON path) keeps its nesting here


@dataclass
class UpstreamIndex(FileIndex):
    """A :class:`FileIndex` for an upstream file, plus what only upstream files have."""

    version: int = 0
    feature_flags: int = 0
    upstream: dict[str, UpstreamTensor] = field(default_factory=dict)


def decode_dtype(raw: bytes) -> torch.dtype:
    """The torch dtype of an upstream dtype string (numpy ``dtype.str`` or the opaque ``<V2\\0torch.x``).

    Raises:
        UnknownDtypeError: anything else (big-endian, object, unknown torch dtypes, width mismatch).
    """
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise UnknownDtypeError(f"upstream dtype {raw!r} is not ASCII") from None
    if "\0" not in text:
        dt = _NUMPY_DTYPES.get(text)
        if dt is None:
            raise UnknownDtypeError(f"unsupported upstream dtype {text!r}")
        return dt
    base, _, torch_name = text.partition("\0")
    dt = DTYPES.get(torch_name.removeprefix("torch.")) if torch_name.startswith("torch.") else None
    if dt is None or base[:2] not in ("<V", "|V") or base[2:] != str(dt.itemsize):
        raise UnknownDtypeError(f"unsupported upstream opaque dtype {text!r}")
    return dt


def decode_name(raw: bytes) -> str:
    """The state-dict key of an upstream tensor name.

    Structured names (``\\x1e`` + JSON array) join their components with dots; ``write_module``
    names of the root module's own tensors (``.weight``) lose their leading dot.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"tensor name {raw[:64]!r} is not UTF-8") from None
    if text.startswith("\x1e"):
        try:
            parts = json.loads(text[1:])
        except (json.JSONDecodeError, RecursionError):
            raise FormatError(f"structured tensor name {text[:64]!r} is not a JSON array") from None
        ok = isinstance(parts, list) and parts and all(type(p) in (str, int) for p in parts)
        _need(bool(ok), f"structured tensor name {text[:64]!r} must be a non-empty array of str/int")
        text = ".".join(str(p) for p in parts)
    elif text.startswith(".") and len(text) > 1:
        text = text[1:]
    _need(text != "", "empty tensor name")
    return text


class _Reader:
    """Bounds-checked little-endian reads over a byte buffer; running off the end is a typed error."""

    def __init__(self, buf: bytes | memoryview, pos: int, end: int, what: str) -> None:
        self.buf, self.pos, self.end, self.what = buf, pos, end, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise TruncatedFileError(f"{self.what}: needs {n} more bytes at offset {self.pos}, ends at {self.end}")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))

    def one(self, fmt: str) -> Any:
        return self.unpack(fmt)[0]


class _NeedMore(Exception):
    """The metadata block bytes at hand end before the entries do: fetch more and parse again."""


class _Block:
    """A cursor over the part of the metadata block at hand (``data``) of a block ``length`` bytes long."""

    def __init__(self, data: bytes, length: int) -> None:
        self.data, self.length, self.pos = data, length, 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            if end > self.length:
                raise TruncatedFileError(f"upstream index: entry runs past the metadata block ({self.length} bytes)")
            raise _NeedMore
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def one(self, fmt: str) -> Any:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))[0]


@dataclass
class _Raw:
    """An index entry before its per-tensor header is read."""

    name: str
    raw_name: bytes
    type: int
    raw_dtype: bytes
    dtype: torch.dtype
    shape: tuple[int, ...]
    long_dims: bool
    header_offset: int
    data_offset: int
    data_length: int


def _parse_entries(block: _Block, count: int, versioned: bool) -> list[_Raw]:
    out: list[_Raw] = []
    for i in range(count):
        entry_version = block.one("I") if versioned else 1
        if entry_version not in (1, 5):
            raise UnsupportedVersionError(f"upstream index entry {i} has unknown entry version {entry_version}")
        raw_name = block.take(block.one("H"))
        ttype = block.one("B")
        raw_dtype = block.take(block.one("B"))
        ndim = block.one("B")
        code = "Q" if entry_version == 5 else "I"
        shape = struct.unpack(f"<{ndim}{code}", block.take(ndim * struct.calcsize(code)))
        hoff, doff, dlen = struct.unpack("<QQQ", block.take(24))
        name = decode_name(raw_name)
        _need(ttype in _KINDS, f"tensor {name!r}: unknown tensor type {ttype}")
        dtype = decode_dtype(raw_dtype)
        out.append(_Raw(name, raw_name, ttype, raw_dtype, dtype, shape, code == "Q", hoff, doff, dlen))
    return out


def _validate(raws: list[_Raw], meta_end: int, size: int, version: int) -> None:
    seen: set[str] = set()
    meta_bytes = 0
    for e in raws:
        where = f"tensor {e.name!r}"
        _need(e.name not in seen, f"duplicate tensor name {e.name!r}")
        seen.add(e.name)
        _need(meta_end <= e.header_offset < e.data_offset, f"{where}: header offset {e.header_offset} is invalid")
        _need(e.data_offset - e.header_offset <= MAX_TENSOR_HEADER, f"{where}: tensor header is too large")
        _need(e.data_offset + e.data_length <= size, f"{where}: data runs past the file end ({size} bytes)")
        _need(math.prod(d for d in e.shape if d) < 1 << 62, f"{where}: shape {list(e.shape)[:8]} is too large")
        nbytes = math.prod(e.shape) * e.dtype.itemsize
        if e.data_length != nbytes:
            _need(e.data_length == 0 and version >= 4, f"{where}: data length {e.data_length} != {nbytes} bytes")
            meta_bytes += nbytes
    if meta_bytes > MAX_META_BYTES:
        raise HeaderTooLargeError(f"meta tensors would allocate {meta_bytes} bytes (cap {MAX_META_BYTES})")
    end, prev = meta_end, "<index>"
    for e in sorted(raws, key=lambda e: e.header_offset):
        _need(e.header_offset >= end, f"tensor {e.name!r} overlaps {prev!r}")
        end, prev = e.data_offset + e.data_length, e.name


def _header_groups(raws: list[_Raw]) -> list[list[_Raw]]:
    """Per-tensor headers close to each other (small tensors between them) are fetched in one read."""
    groups: list[list[_Raw]] = []
    for e in sorted(raws, key=lambda e: e.header_offset):
        g = groups[-1] if groups else None
        if (
            g
            and e.header_offset - g[-1].data_offset <= _HEADER_GAP
            and e.data_offset - g[0].header_offset <= _HEADER_SPAN
        ):
            g.append(e)
        else:
            groups.append([e])
    return groups


def _parse_crypt(body: bytes, e: _Raw) -> dict[str, Any]:
    where = f"tensor {e.name!r} crypt info"
    r = _Reader(body, 0, len(body), where)
    out: dict[str, Any] = {"scheme": CRYPT_SCHEME}
    for _ in range(r.one("H")):
        clen = r.one("Q")
        _need(2 <= clen <= r.end - r.pos, f"{where}: chunk length {clen} is invalid")
        c = _Reader(r.take(clen), 0, clen, where)
        ctype = c.one("H")
        if ctype == 1:  # KeyDerivation
            method = c.one("H")
            ops, mem, alg, salt_len = c.unpack("QQiH")
            _need(method == 1 and alg == 2, f"{where}: unsupported key derivation (method {method}, alg {alg})")
            _need(1 <= salt_len <= 64, f"{where}: salt length {salt_len} is invalid")
            out["kdf"] = {"opslimit": ops, "memlimit": mem, "salt": c.take(salt_len)}
        elif ctype == 2:  # XSalsa20Parallel
            size, nonce, macs = c.one("Q"), c.take(24), c.one("Q")
            _need(1024 <= size <= MAX_CHUNK_SIZE and size % 64 == 0, f"{where}: chunk size {size} is invalid")
            _need(macs == -(-e.data_length // size), f"{where}: {macs} MACs for {e.data_length} bytes")
            out.update(chunk_size=size, nonce=nonce, macs=tuple(c.take(16) for _ in range(macs)))
        elif ctype == 3:
            raise UnsupportedVersionError(f"{where}: XSalsa20Sequential encryption is not supported")
        else:
            raise UnsupportedVersionError(f"{where}: unknown crypt chunk type {ctype}")
        _need(c.pos == c.end, f"{where}: chunk of type {ctype} has {c.end - c.pos} trailing bytes")
    _need(r.pos == r.end, f"{where}: {r.end - r.pos} trailing bytes")
    _need("chunk_size" in out or not e.data_length, f"{where}: no XSalsa20Parallel chunk")
    return out


def _parse_tensor_header(buf: bytes, at: int, e: _Raw, encrypted: bool) -> tuple[UpstreamTensor, dict | None]:
    where = f"tensor {e.name!r} header"
    total = e.data_offset - e.header_offset
    r = _Reader(buf, at, at + total, where)
    _need(r.one("Q") == total, f"{where}: header size disagrees with the index")
    module_index, ttype = r.unpack("HB")
    _need(ttype == e.type, f"{where}: tensor type disagrees with the index")
    _need(r.take(r.one("H")) == e.raw_name, f"{where}: name disagrees with the index")
    _need(r.take(r.one("B")) == e.raw_dtype, f"{where}: dtype disagrees with the index")
    ndim = r.one("B")
    dims = r.unpack(f"{ndim}{'Q' if e.long_dims else 'I'}")
    _need(dims == e.shape, f"{where}: shape disagrees with the index")
    hash_len = r.one("H")
    hash_start, hash_end = r.pos, r.pos + hash_len
    _need(hash_end <= r.end, f"{where}: hash section runs past the header")
    h = _Reader(buf, hash_start, hash_end, where)
    prefix = bytearray(buf[at:hash_end])
    crc = sha = None
    for _ in range(h.one("B")):
        htype, hlen = h.unpack("BB")
        value_at = h.pos
        value = h.take(hlen)
        if htype == 0 and hlen == 4:
            crc = struct.unpack("<I", value)[0]
        elif htype == 1 and hlen == 32:
            sha = value
        prefix[value_at - at : value_at - at + hlen] = bytes(hlen)  # hashes cover their own slot as zeros
    r.pos = hash_end
    crypt = None
    if encrypted:
        crypt = _parse_crypt(r.take(r.one("Q")), e)
    tail_at = r.pos
    dlen = r.one("q")
    _need(dlen == e.data_length, f"{where}: data length {dlen} disagrees with the index ({e.data_length})")
    _need(r.pos == r.end, f"{where}: {r.end - r.pos} unexpected bytes before the data")
    prefix += buf[tail_at : r.pos]
    return UpstreamTensor(e.header_offset, module_index, bytes(prefix), crc, sha, e.raw_name), crypt


def decode_upstream(size: int, head: bytes) -> Generator[list[tuple[int, int]], list[bytes], UpstreamIndex]:
    """Parse an upstream file's header, index and per-tensor headers into a validated index.

    A generator: it yields lists of ``(offset, length)`` ranges it needs and is sent their bytes, in order;
    its return value is the index (``hf_tensorizer.engine.header.read_index`` drives it).

    Args:
        size: the file size in bytes.
        head: the first bytes of the file (any length; more is asked for as needed).

    Raises:
        FormatError: and its typed subclasses for anything malformed or inconsistent.
    """
    _need(bytes(head[:5]) == UPSTREAM_MAGIC, "not an upstream tensorizer file")
    head = bytes(head)
    if len(head) < HEADER_END:
        if size > len(head):
            head += (yield [(len(head), min(size, HEADER_END) - len(head))])[0]
        if len(head) < HEADER_END:
            raise TruncatedFileError(f"upstream file is {size} bytes, shorter than its {HEADER_END}-byte header")
    version, raw_flags, _tensor_size, count = _FILE_HEADER.unpack_from(head, 5)
    if not 1 <= version <= MAX_VERSION:
        raise UnsupportedVersionError(f"upstream tensorizer version {version} is not supported (1..{MAX_VERSION})")
    # upstream reads the flags field in every version (writers before version 4 leave it zero) and refuses
    # unknown bits in all of them; the encrypted bit means something from version 4 on
    flags = int.from_bytes(raw_flags, "little")
    unknown = flags & ~(FLAG_ENCRYPTED | FLAG_VERSIONED_ENTRIES)
    if unknown:
        raise UnsupportedVersionError(f"upstream file needs unknown feature flags 0x{unknown:x}")
    versioned = bool(flags & FLAG_VERSIONED_ENTRIES)
    _need(not versioned or version >= 5, f"versioned index entries need version 5, file is version {version}")
    encrypted = version == 3 or (version >= 4 and bool(flags & FLAG_ENCRYPTED))
    _need(count > 0, "upstream tensor index is empty (0 tensors): upstream refuses such a file")
    meta_len = _Q.unpack_from(head, HEADER_END - 8)[0]
    if meta_len > MAX_INDEX_BYTES:
        raise HeaderTooLargeError(f"upstream metadata block of {meta_len} bytes exceeds {MAX_INDEX_BYTES}")
    if HEADER_END + meta_len > size:
        raise TruncatedFileError(f"upstream metadata block ends at {HEADER_END + meta_len}, file is {size} bytes")
    _need(count <= meta_len // _MIN_ENTRY, f"{count} tensors cannot fit a {meta_len}-byte metadata block")
    block = head[HEADER_END : HEADER_END + meta_len]
    while True:  # entries are parsed from what is at hand; more of the block is asked for when they run past it
        try:
            raws = _parse_entries(_Block(block, meta_len), count, versioned)
            break
        except _NeedMore:
            want = min(meta_len, max(2 * len(block), 64 << 10))
            block += (yield [(HEADER_END + len(block), want - len(block))])[0]
    meta_end = HEADER_END + meta_len
    _validate(raws, meta_end, size, version)
    groups = _header_groups(raws)
    bufs = yield [(g[0].header_offset, g[-1].data_offset - g[0].header_offset) for g in groups]
    fetched = {e.name: (buf, e.header_offset - g[0].header_offset) for g, buf in zip(groups, bufs) for e in g}
    tensors: dict[str, TensorEntry] = {}
    extra: dict[str, UpstreamTensor] = {}
    chunk_sizes: set[int] = set()
    for e in raws:
        info, crypt = _parse_tensor_header(*fetched[e.name], e, encrypted)
        if crypt is not None and e.data_length:
            chunk_sizes.add(crypt["chunk_size"])
        extra[e.name] = info
        tensors[e.name] = TensorEntry(e.name, e.dtype, tuple(e.shape), _KINDS[e.type], e.data_offset,
                                      e.data_length, (), None, crypt)  # fmt: skip
    block_size = math.lcm(*chunk_sizes) if chunk_sizes else 16 << 20
    if block_size > MAX_BLOCK_SIZE:
        raise UnsupportedVersionError(f"tensors use incompatible encryption chunk sizes {sorted(chunk_sizes)}")
    return UpstreamIndex(
        tensors=tensors,
        metadata={"format": "coreweave-tensorizer", "tensorizer_version": str(version)},
        alignment=1,
        block_size=block_size,
        digest="none",
        data_offset=min((e.data_offset for e in raws), default=meta_end),
        file_size=size,
        required_features=FEATURE_ENCRYPTED if encrypted else 0,
        encryption={"scheme": CRYPT_SCHEME} if encrypted else None,
        version=version,
        feature_flags=flags,
        upstream=extra,
    )


def hash_matches(info: UpstreamTensor, data: bytes | memoryview) -> bool:
    """Whether ``data`` (a tensor's stored bytes) matches the CRC32/SHA-256 of its upstream header.

    Upstream hashes cover the per-tensor header (with the hash slots zeroed) followed by the whole tensor.
    A tensor whose header has no hash matches trivially.
    """
    ok = info.crc32 is None or zlib.crc32(data, zlib.crc32(info.hash_prefix)) == info.crc32
    if info.sha256 is not None:
        h = hashlib.sha256(info.hash_prefix)
        h.update(data)
        ok = ok and h.digest() == info.sha256
    return ok
