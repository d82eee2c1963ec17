"""Small helpers shared by the format and engine tests: real sources, byte comparisons, header surgery.

Nothing here mocks the library: sources are real :class:`~hf_tensorizer.sources.Source` implementations
(in memory, or a local file that records which ranges were read), and edited headers carry a recomputed,
valid SHA-256 so that the parser itself is exercised.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hf_tensorizer import TensorSerializer
from hf_tensorizer.errors import TruncatedFileError
from hf_tensorizer.format.index import MAGIC, PREAMBLE_SIZE, FileIndex
from hf_tensorizer.sources import FileSource, Source

# preamble field -> (byte offset, struct format), see format/index.py ``_PREAMBLE``
PREAMBLE_FIELDS: dict[str, tuple[int, str]] = {
    "version": (8, "<I"),
    "preamble_size": (12, "<I"),
    "required_features": (16, "<Q"),
    "optional_features": (24, "<Q"),
    "index_length": (32, "<Q"),
    "data_offset": (40, "<Q"),
    "file_size": (48, "<Q"),
}
SHA_OFFSET = 56


class BytesSource(Source):
    """A file held in memory: the engine reads it exactly as it reads a local file (no file descriptor)."""

    def __init__(self, data: bytes, uri: str = "memory://test") -> None:
        self._data = bytes(data)
        self.size = len(self._data)
        self.uri = uri

    def read_into(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        if offset < 0 or end > self.size:
            raise TruncatedFileError(f"{self.uri} ends at {self.size}, read wanted [{offset}, {end})")
        buf[:] = self._data[offset:end]


class RecordingSource(FileSource):
    """A local file that records every byte range read through it (thread-safe)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self.ranges: list[tuple[int, int]] = []
        self._rec_lock = threading.Lock()

    def read_into_many(self, offset: int, bufs: Sequence[memoryview], fd: int | None = None) -> None:
        with self._rec_lock:
            self.ranges.append((offset, sum(len(b) for b in bufs)))
        super().read_into_many(offset, bufs, fd)

    def bytes_read_in(self, start: int, end: int, *, data_offset: int = 0) -> int:
        """How many bytes of ``[start, end)`` were read by requests starting at or after ``data_offset``
        (pass the file's data offset to leave out the header request, which may run past the index)."""
        return sum(max(0, min(end, o + n) - max(start, o)) for o, n in self.ranges if o >= data_offset)


def random_tensor(dtype: torch.dtype, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A tensor whose bytes are uniformly random (NaN payloads, denormals, any bit pattern)."""
    numel = 1
    for d in shape:
        numel *= d
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw & 1  # other bool bit patterns are undefined behaviour in torch, not a format question
    return raw.view(dtype).reshape(tuple(shape))


def mixed_state_dict() -> dict[str, torch.Tensor]:
    """A small seeded state dict of four dtypes (float32, bfloat16, int64, bool) with odd shapes."""
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(300, 257, generator=g),
        "h": torch.randn(64, 3, generator=g).to(torch.bfloat16),
        "i": torch.arange(1000, dtype=torch.int64),
        "b": torch.rand(77, generator=g) > 0.5,
    }


def mapped_fraction(t: torch.Tensor) -> float:
    """The share of ``t``'s pages present in this process's page tables (``/proc/self/pagemap``)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = t.data_ptr() // page, (t.data_ptr() + t.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = struct.unpack(f"{last - first + 1}Q", f.read((last - first + 1) * 8))
    return sum(1 for e in entries if e >> 63) / len(entries)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of ``t`` (any dtype, any layout, conj/neg bits resolved)."""
    t = t.detach().resolve_conj().resolve_neg().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return bytes(t.reshape(-1).view(torch.uint8).numpy())


def assert_same(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Same dtype, shape and bytes (bit-exact, so NaN payloads count)."""
    assert isinstance(actual, torch.Tensor), name
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    assert tuple(actual.shape) == tuple(expected.shape), (name, actual.shape, expected.shape)
    assert tensor_bytes(actual) == tensor_bytes(expected), f"bytes of {name!r} differ"


def assert_same_dict(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for k, v in expected.items():
        assert_same(actual[k], v, k)


def write_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], **kwargs: Any) -> FileIndex:
    """Serialize ``tensors`` to ``path``; returns the written index."""
    s = TensorSerializer(path, **kwargs)
    s.write_state_dict(tensors)
    return s.close()


def file_bytes(tensors: Mapping[str, torch.Tensor], tmp: Path, **kwargs: Any) -> bytes:
    """The bytes of a file holding ``tensors`` (written through the real serializer)."""
    path = tmp / "scratch.tensors"
    write_file(path, tensors, **kwargs)
    data = path.read_bytes()
    path.unlink()
    return data


def preamble_field(data: bytes, field: str) -> int:
    off, fmt = PREAMBLE_FIELDS[field]
    return struct.unpack_from(fmt, data, off)[0]


def patch_preamble(data: bytes, **fields: int) -> bytes:
    """``data`` with preamble fields replaced (the index digest is left as it was)."""
    out = bytearray(data)
    for name, value in fields.items():
        off, fmt = PREAMBLE_FIELDS[name]
        struct.pack_into(fmt, out, off, value)
    return bytes(out)


def index_doc(data: bytes) -> dict[str, Any]:
    """The decoded JSON index of a valid file."""
    n = preamble_field(data, "index_length")
    return json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + n])


def with_raw_index(data: bytes, raw: bytes) -> bytes:
    """``data`` with its index replaced by ``raw`` and a recomputed, valid SHA-256.

    The data offset stays where it is when ``raw`` fits in front of it; otherwise the data section moves
    to the next 4 KiB boundary (entry offsets inside ``raw`` are then stale: fine for garbage indexes).
    """
    assert data[:8] == MAGIC
    doff = preamble_field(data, "data_offset")
    new_doff = max(doff, -(-(PREAMBLE_SIZE + len(raw)) // 4096) * 4096)
    body = data[doff:]
    fields = {"index_length": len(raw), "data_offset": new_doff, "file_size": new_doff + len(body)}
    head = bytearray(patch_preamble(data[:PREAMBLE_SIZE], **fields))
    head[SHA_OFFSET : SHA_OFFSET + 32] = hashlib.sha256(raw).digest()
    return bytes(head) + raw + b" " * (new_doff - PREAMBLE_SIZE - len(raw)) + body


def with_index(data: bytes, mutate: Callable[[dict[str, Any]], Any]) -> bytes:
    """``data`` with its JSON index edited in place by ``mutate(doc)`` (digest recomputed)."""
    doc = index_doc(data)
    mutate(doc)
    return with_raw_index(data, json.dumps(doc, separators=(",", ":")).encode())


def entry(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The JSON entry called ``name`` in an index document."""
    return next(e for e in doc["tensors"] if e["name"] == name)


def flip_byte(path: str | os.PathLike[str], offset: int, mask: int = 0xFF) -> None:
    """XOR one byte of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def meta_tensors(module: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (a complete load leaves none)."""
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def make_ca_and_cert(directory: Path) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hf_tensorizer test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tuple(str(p) for p in paths)  # type: ignore[return-value]
