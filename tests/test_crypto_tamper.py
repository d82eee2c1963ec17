"""Tampering with encrypted files: every bit flip, block moves, truncation, splices across tensors and files.

The small file is loaded from memory (a real ``Source`` over a mutable buffer) with one reader thread, so
an exhaustive sweep of every bit of the file takes a few seconds. A load of a tampered file must either
raise a typed ``TensorizerError`` or return tensors bit-identical to the originals (bytes that nothing
interprets: preamble reserved bytes, index padding, alignment gaps); it never returns anything else.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.crypto import EncryptionKey, FileKeys
from hf_tensorizer.crypto.seal import BlockCipher, open_section, sealed_header
from hf_tensorizer.engine.header import read_index
from hf_tensorizer.errors import DecryptionError, TensorizerError, TruncatedFileError
from hf_tensorizer.format.index import PREAMBLE_SIZE, FileIndex, TensorEntry, encode_index
from hf_tensorizer.sources import Source

BLOCK = 4096  # the smallest block the format allows: multi-block tensors stay tiny


class MemSource(Source):
    """A file held in a mutable buffer, so a test can flip a bit, load, and flip it back."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)
        self.size = len(self.data)
        self.uri = "memory://tamper"

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset + len(buf) > self.size:
            raise TruncatedFileError(f"{self.uri} ends at {self.size}")
        buf[:] = self.data[offset : offset + len(buf)]


def _tiny() -> dict[str, torch.Tensor]:
    """Every kind of entry, all in one block each: small enough to flip every bit of the file."""
    g = torch.Generator().manual_seed(3)
    sd = {"w": torch.randn(3, 5, generator=g), "ids": torch.arange(7, dtype=torch.int8),
          "h": torch.randn(40, generator=g).half(), "empty": torch.empty(0, 4)}  # fmt: skip
    sd["tied"] = sd["w"]
    return sd


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    sd = {
        "w": torch.randn(3, 5, generator=g),  # one partial block
        "ids": torch.arange(7, dtype=torch.int8),
        "big": torch.randn(2 * BLOCK // 4 + 3, generator=g),  # two full blocks and a tail
        "x": torch.randn(BLOCK // 4, generator=g),  # x and y: same size, for cross-tensor swaps
        "y": torch.randn(BLOCK // 4, generator=g),
        "empty": torch.empty(0, 4),
    }
    sd["tied"] = sd["w"]
    return sd


def _write(tmp_path, name: str, key: EncryptionKey, sd: dict[str, torch.Tensor] | None = None, **kw) -> bytes:
    path = tmp_path / name
    with TensorSerializer(path, encryption=key, block_size=BLOCK, alignment=64, **kw) as s:
        s.write_state_dict(sd if sd is not None else _state())
    return path.read_bytes()


def _load(data: bytes | bytearray | MemSource, key: EncryptionKey, **kw) -> dict[str, torch.Tensor]:
    src = data if isinstance(data, MemSource) else MemSource(data)
    with TensorDeserializer(src, encryption=key, num_readers=1, **kw) as d:
        return dict(d)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    key = EncryptionKey.generate()
    data = _write(tmp_path_factory.mktemp("tiny"), "tiny.tensors", key, _tiny())
    return key, data, read_index(MemSource(data))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    key = EncryptionKey.generate()
    data = _write(tmp_path_factory.mktemp("tamper"), "small.tensors", key)
    return key, data, read_index(MemSource(data))


def _regions(index: FileIndex) -> tuple[list[range], list[range]]:
    """(byte ranges every flip of which must be detected, ranges nothing interprets)."""
    must = [range(0, 120), range(PREAMBLE_SIZE, PREAMBLE_SIZE + len(index.raw_index))]  # preamble fields, index
    must += [range(e.offset, e.offset + e.length) for e in index.data_entries]  # ciphertext
    covered = set().union(*(set(r) for r in must))
    free = [range(i, i + 1) for i in range(index.file_size) if i not in covered]
    return must, free


def _sweep(key: EncryptionKey, data: bytes, expected: dict[str, torch.Tensor], flips) -> tuple[list, int, set]:
    original = _load(data, key)
    assert _same(original, expected)
    must, _ = _regions(read_index(MemSource(data)))
    must_bytes = {i for r in must for i in r}
    src = MemSource(data)
    undetected, harmless = [], 0
    for pos, bit in flips:
        src.data[pos] ^= 1 << bit
        try:
            out = _load(src, key)
        except TensorizerError:
            pass
        else:
            if pos in must_bytes or not _same(out, original):
                undetected.append((pos, bit))
            harmless += 1
        src.data[pos] ^= 1 << bit
    return undetected, harmless, must_bytes


def test_every_bit_flip_of_a_tiny_file_is_detected(tiny):
    """Exhaustive: all 8 flips of every byte of the file (preamble, index with its MACs, all ciphertext)."""
    key, data, _ = tiny
    flips = [(pos, bit) for pos in range(len(data)) for bit in range(8)]
    undetected, harmless, must_bytes = _sweep(key, data, _tiny(), flips)
    assert not undetected, f"flips not detected at (byte, bit): {undetected[:10]}"
    # only uninterpreted bytes (reserved preamble bytes, padding, gaps) may be flipped without an error
    assert harmless == 8 * (len(data) - len(must_bytes))


def test_one_bit_of_every_byte_of_a_multi_block_file_is_detected(small):
    """Every byte of a file with multi-block tensors, one random bit each."""
    key, data, _ = small
    rng = random.Random(5)
    flips = [(pos, rng.randrange(8)) for pos in range(len(data))]
    undetected, _, _ = _sweep(key, data, _state(), flips)
    assert not undetected, f"flips not detected at (byte, bit): {undetected[:10]}"


def test_ciphertext_flips_raise_decryption_error_naming_the_tensor(small):
    key, data, index = small
    rng = random.Random(0)
    for e in index.data_entries:
        if not e.length:
            continue
        for _ in range(4):
            pos = e.offset + rng.randrange(e.length)
            bad = bytearray(data)
            bad[pos] ^= 1 << rng.randrange(8)
            with pytest.raises(DecryptionError, match=repr(e.name)):
                _load(bad, key)


def test_sampled_bit_flips_of_a_larger_file_are_detected(tmp_path):
    key = EncryptionKey.generate()
    g = torch.Generator().manual_seed(1)
    sd = {f"layer{i}.weight": torch.randn(64, 257, generator=g) for i in range(12)}
    data = _write(tmp_path, "large.tensors", key, sd)
    index = read_index(MemSource(data))
    must, _ = _regions(index)
    positions = [i for r in must for i in r]
    rng = random.Random(7)
    src = MemSource(data)
    for pos in rng.sample(positions, 600):
        bit = 1 << rng.randrange(8)
        src.data[pos] ^= bit
        with pytest.raises(TensorizerError):
            _load(src, key, lazy=False)
        src.data[pos] ^= bit


def _edit_index(data: bytes, edit) -> bytes:
    """Change the JSON index, keep the old auth tag, and fix the SHA-256 so only the tag can object."""
    index = read_index(MemSource(data))
    doc = json.loads(index.raw_index)
    edit(doc)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    assert len(raw) <= index.data_offset - PREAMBLE_SIZE
    import hashlib

    pre = dataclasses.replace(index.preamble, index_length=len(raw), index_sha256=hashlib.sha256(raw).digest())
    head = pre.encode() + raw
    return head + b" " * (index.data_offset - len(head)) + data[index.data_offset :]


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["tensors"][1].update(name="renamed"),
        lambda d: d["tensors"][1].update(dtype="uint8"),
        lambda d: d["tensors"][1].update(shape=[7, 1]),
        lambda d: d["tensors"][1].update(offset=d["tensors"][1]["offset"] + 1),
        lambda d: d["tensors"][1].update(kind="buffer"),
        lambda d: d["metadata"].update(added="1"),
        lambda d: d["tensors"].reverse(),
        lambda d: d.update(digest="none") or [t.update(digests=[]) for t in d["tensors"] if "offset" in t],
        lambda d: d["tensors"][2]["crypt"]["macs"].reverse(),
        lambda d: d["encryption"].update(salt="00" * 32),
    ],
    ids=["name", "dtype", "shape", "offset", "kind", "metadata", "order", "digest", "mac-order", "salt"],
)
def test_index_edits_with_a_valid_sha256_fail_authentication(small, edit):
    key, data, _ = small
    with pytest.raises(DecryptionError):
        _load(_edit_index(data, edit), key)
    with pytest.raises(DecryptionError):  # lazy loads authenticate up front too, before any tensor access
        TensorDeserializer(MemSource(_edit_index(data, edit)), encryption=key, lazy=True)


def _resign(data: bytes, key: EncryptionKey, edit) -> bytes:
    """A forger holding the key: edit the index and re-sign it, to test the nonces' binding on its own."""
    index = read_index(MemSource(data))
    keys = open_section(index.encryption, key)
    tensors = {n: edit(e) for n, e in index.tensors.items()}
    new = dataclasses.replace(index, tensors=tensors)
    head = sealed_header(new, keys)
    assert len(head) == index.data_offset
    return head + data[index.data_offset :]


def _swap(data: bytes, a: range, b: range) -> bytes:
    out = bytearray(data)
    out[a.start : a.stop], out[b.start : b.stop] = data[b.start : b.stop], data[a.start : a.stop]
    return bytes(out)


def test_block_reorder_and_duplication_are_detected(small):
    key, data, index = small
    big = index.tensors["big"]
    b0, b1 = range(big.offset, big.offset + BLOCK), range(big.offset + BLOCK, big.offset + 2 * BLOCK)
    with pytest.raises(DecryptionError, match="'big'"):
        _load(_swap(data, b0, b1), key)
    dup = bytearray(data)
    dup[b1.start : b1.stop] = data[b0.start : b0.stop]
    with pytest.raises(DecryptionError, match="'big'"):
        _load(bytes(dup), key)

    # even with the MACs moved along and the header re-signed, the nonce binds each block to its index
    def swap_macs(e: TensorEntry) -> TensorEntry:
        if e.name != "big":
            return e
        m = list(e.crypt["macs"])
        m[0], m[1] = m[1], m[0]
        return dataclasses.replace(e, crypt={"macs": m})

    with pytest.raises(DecryptionError, match="'big'"):
        _load(_resign(_swap(data, b0, b1), key, swap_macs), key)


def test_cross_tensor_swap_is_detected(small):
    key, data, index = small
    x, y = index.tensors["x"], index.tensors["y"]
    rx, ry = range(x.offset, x.offset + x.length), range(y.offset, y.offset + y.length)
    swapped = _swap(data, rx, ry)
    with pytest.raises(DecryptionError):
        _load(swapped, key)

    def swap_crypt(e: TensorEntry) -> TensorEntry:
        other = {"x": y, "y": x}.get(e.name)
        return e if other is None else dataclasses.replace(e, crypt=other.crypt, digests=other.digests)

    with pytest.raises(DecryptionError):
        _load(_resign(swapped, key, swap_crypt), key)


def test_truncation_is_detected(small):
    key, data, index = small
    for cut in (1, 100, index.file_size - index.data_offset):
        with pytest.raises(TruncatedFileError):
            _load(data[:-cut], key)
    # a shorter file whose preamble claims the shorter size: the tag catches the edited size
    short = bytearray(data[:-BLOCK])
    pre = dataclasses.replace(index.preamble, file_size=len(short))
    short[:PREAMBLE_SIZE] = pre.encode()
    with pytest.raises(TensorizerError):
        _load(bytes(short), key)


def test_cross_file_splices_are_detected(tmp_path, small):
    key, data, index = small
    other = _write(tmp_path, "other.tensors", key)  # same key, same layout, different salt
    assert len(other) == len(data)
    assert _same(_load(other, key), _load(data, key))
    big = index.tensors["big"]
    block = range(big.offset, big.offset + BLOCK)
    spliced = bytearray(data)
    spliced[block.start : block.stop] = other[block.start : block.stop]
    with pytest.raises(DecryptionError, match="'big'"):
        _load(bytes(spliced), key)
    with pytest.raises(DecryptionError):  # other file's header (its MACs, its salt) on this file's data
        _load(other[: index.data_offset] + data[index.data_offset :], key)


def test_block_cipher_binds_name_and_position():
    keys = FileKeys(b"k" * 32, b"s" * 32)
    cipher = BlockCipher(keys, BLOCK)
    plain = memoryview(bytes(range(256)) * 16)
    ct, mac = cipher.seal("a", 3, plain)
    for name, block in (("b", 3), ("a", 2), ("a", 4)):
        with pytest.raises(DecryptionError):
            cipher.open_into(name, block, mac, memoryview(bytearray(ct)))
    other = BlockCipher(FileKeys(b"k" * 32, b"t" * 32), BLOCK)  # another file's salt
    with pytest.raises(DecryptionError):
        other.open_into("a", 3, mac, memoryview(bytearray(ct)))
    buf = bytearray(ct)
    cipher.open_into("a", 3, mac, memoryview(buf))
    assert bytes(buf) == bytes(plain)
    assert bytes(ct) != bytes(plain)


def test_encode_index_of_read_index_is_byte_identical(small):
    """The tag is computed over the index bytes as stored; re-encoding must not be needed to verify it."""
    index = small[2]
    assert encode_index(index) == index.raw_index
