"""Hypothesis fuzzing of the reader: mutated valid files and random headers with valid digests.

Property, for every input: either a typed :class:`~hf_tensorizer.errors.TensorizerError`, or a load whose
tensors equal what the file holds (bit flips in padding or ignored preamble fields may pass). Never another
exception type, never a hang (each test has a timeout). Files are tiny, so a few thousand cases run in
well under a minute.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import BytesSource, assert_same, file_bytes, index_doc, preamble_field, random_tensor, tensor_bytes
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_tensorizer import TensorDeserializer, read_index
from hf_tensorizer.errors import TensorizerError, TruncatedFileError
from hf_tensorizer.format import DTYPES, MAGIC, PREAMBLE_SIZE, Preamble
from hf_tensorizer.format.index import VERSION

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")]

FUZZ = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


def fuzz(examples: int) -> settings:
    """Fixed-seed settings: CI runs the same few thousand cases every time, no example database on disk."""
    return settings(FUZZ, max_examples=examples)


W = random_tensor(torch.float32, (300,), 1)
TENSORS: dict[str, torch.Tensor] = {
    "w": W,
    "i8": random_tensor(torch.int8, (5, 3), 2),
    "bf16.scalar": random_tensor(torch.bfloat16, (), 3),
    "empty": torch.zeros(0, 2, dtype=torch.float16),
    "tied": W,
    "c64": random_tensor(torch.complex64, (4,), 4),
    "pad.u8": random_tensor(torch.uint8, (4500,), 5),  # > 4 KiB: page-aligned, leaves padding before it
}
with tempfile.TemporaryDirectory() as _tmp:
    GOOD = file_bytes(TENSORS, Path(_tmp), block_size=4096)
ILEN = preamble_field(GOOD, "index_length")
DOFF = preamble_field(GOOD, "data_offset")
GOOD_DOC = index_doc(GOOD)


def load(data: bytes, **kwargs: Any) -> dict[str, torch.Tensor] | None:
    """Parse and load ``data``: the tensors, or None after a typed error. Any other exception propagates."""
    try:
        read_index(BytesSource(data))
        with TensorDeserializer(BytesSource(data), verify_hash=True, num_readers=1, **kwargs) as d:
            out = dict(d)
            if "tied" in out:
                assert out["tied"] is out["w"]
            return out
    except TensorizerError as exc:
        event(f"refused: {type(exc).__name__}")
        return None


def check_mutant(data: bytes) -> None:
    out = load(data)
    if out is not None:  # the mutation hit padding or a field the reader may ignore: data must be intact
        event("loaded")
        assert sorted(out) == sorted(TENSORS)
        for k, v in TENSORS.items():
            assert_same(out[k], v, k)


def test_original_loads() -> None:
    out = load(GOOD)
    assert out is not None
    for k, v in TENSORS.items():
        assert_same(out[k], v, k)


positions = st.one_of(st.integers(0, PREAMBLE_SIZE + ILEN - 1), st.integers(0, len(GOOD) - 1))


@fuzz(1500)
@given(flips=st.lists(st.tuples(positions, st.integers(0, 7)), min_size=1, max_size=4))
def test_bit_flips(flips: list[tuple[int, int]]) -> None:
    data = bytearray(GOOD)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    check_mutant(bytes(data))


@fuzz(400)
@given(cut=st.integers(0, len(GOOD) - 1))
def test_truncations(cut: int) -> None:
    with pytest.raises(TruncatedFileError):
        read_index(BytesSource(GOOD[:cut]))


@fuzz(400)
@given(pos=st.integers(0, len(GOOD)), blob=st.binary(min_size=1, max_size=64), delete=st.integers(0, 64))
def test_insertions_and_deletions(pos: int, blob: bytes, delete: int) -> None:
    check_mutant(GOOD[:pos] + blob + GOOD[pos:])
    if delete:
        check_mutant(GOOD[:pos] + GOOD[pos + delete :])


# ---- random headers with a valid SHA-256, so the index parser itself is exercised -------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 64, 4096, 2**63, 2**64 - 1]),
    st.floats(allow_nan=True), st.text(max_size=8),
)  # fmt: skip
json_values = st.recursive(
    json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids)),
    max_leaves=8,
)  # fmt: skip

DATA = 3000  # bytes of random data behind every random header
DATA_OFFSET = 8192
HEX = "0123456789abcdef"


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """An index that is valid by construction (unique names, in-bounds sequential offsets, matching
    lengths and digest counts, aliases to data entries), then often broken in one random place."""
    names = draw(st.lists(st.text(min_size=1, max_size=3), max_size=5, unique=True))
    digest = draw(st.sampled_from(["crc32", "sha256", "none"]))
    block = draw(st.sampled_from([4096, 1 << 20]))
    pos, end = DATA_OFFSET, DATA_OFFSET + DATA
    tensors: list[dict[str, Any]] = []
    for name in names:
        data_entries = [t for t in tensors if "alias" not in t]
        if data_entries and draw(st.integers(0, 4)) == 0:
            target = draw(st.sampled_from(data_entries))
            tensors.append({"name": name, "dtype": target["dtype"], "shape": target["shape"], "alias": target["name"]})
            continue
        dtype = draw(st.sampled_from(list(DTYPES)))
        shape = draw(st.lists(st.integers(0, 9), max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        pos += draw(st.integers(0, 80))
        if pos + numel * DTYPES[dtype].itemsize > end:
            shape, numel = [0], 0
        length = numel * DTYPES[dtype].itemsize
        item: dict[str, Any] = {"name": name, "dtype": dtype, "shape": shape, "offset": pos, "length": length}
        item["kind"] = draw(st.sampled_from(["parameter", "buffer", "plain"]))
        if digest != "none":
            width = 8 if digest == "crc32" else 64
            blocks = -(-length // block)
            item["digests"] = [draw(st.text(HEX, min_size=width, max_size=width)) for _ in range(blocks)]
        tensors.append(item)
        pos += length
    doc: dict[str, Any] = {
        "alignment": draw(st.sampled_from([64, 4096])),
        "block_size": block,
        "digest": digest,
        "metadata": draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
        "tensors": tensors,
    }
    breakage = draw(st.integers(0, 3))
    if breakage == 1:  # a random JSON value in a random top-level place
        doc[draw(st.sampled_from([*doc, "encryption", "extra"]))] = draw(json_values)
    elif breakage == 2 and tensors:  # ... or in a random field of a random entry
        item = draw(st.sampled_from(tensors))
        field = draw(
            st.sampled_from(["name", "dtype", "shape", "kind", "offset", "length", "digests", "alias", "crypt"])
        )
        item[field] = draw(st.one_of(json_values, st.sampled_from([t["name"] for t in tensors])))
    elif breakage == 3 and tensors:  # ... or a plausible number off by a little or a lot
        item = draw(st.sampled_from(tensors))
        field = draw(st.sampled_from(["offset", "length"] if "offset" in item else ["shape"]))
        if field == "shape":
            item["shape"] = [*item["shape"], draw(st.integers(0, 3))]
        else:
            item[field] += draw(st.sampled_from([-65, -1, 1, 7, DATA, 2**64, -(2**64)]))
    return doc


def build(raw: bytes, data: bytes, *, required: int = 0) -> bytes:
    doff = max(DATA_OFFSET, -(-(PREAMBLE_SIZE + len(raw)) // 4096) * 4096)
    pre = Preamble(VERSION, required, 0, len(raw), doff, doff + len(data), hashlib.sha256(raw).digest())
    return pre.encode() + raw + b" " * (doff - PREAMBLE_SIZE - len(raw)) + data


def check_random_file(blob: bytes, tmp: Path | None = None) -> None:
    try:
        idx = read_index(BytesSource(blob))
    except TensorizerError as exc:
        event(f"index refused: {type(exc).__name__}")
        return
    event(f"index accepted, {len(idx.tensors)} tensors")
    for kwargs in ({}, {"lazy": True, "num_readers": 2}):
        try:
            with TensorDeserializer(BytesSource(blob), verify_hash=False, chunk_bytes=1000, **kwargs) as d:
                out = dict(d)
        except TensorizerError as exc:
            event(f"load refused: {type(exc).__name__}")
            continue
        event(f"loaded {len(out)} tensors")
        for name, t in out.items():  # whatever loaded is exactly what the file says
            e = idx.tensors[name]
            e = idx.tensors[e.alias] if e.alias else e
            assert t.dtype == e.dtype and tuple(t.shape) == e.shape
            assert tensor_bytes(t) == blob[e.offset : e.offset + e.length]
    if tmp is not None:  # the local-file paths: mmap views and O_DIRECT through the staging pool
        tmp.write_bytes(blob)
        for kwargs in ({"mmap": True}, {"strategy": "odirect", "num_readers": 2}):
            try:
                with TensorDeserializer(tmp, verify_hash=True, **kwargs) as d:
                    dict(d)
            except TensorizerError:
                pass


@pytest.fixture(scope="module")
def scratch() -> Any:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d) / "fuzz.tensors"


@fuzz(1200)
@given(doc=documents(), data=st.binary(min_size=DATA, max_size=DATA), via_file=st.integers(0, 9))
def test_random_headers(doc: dict[str, Any], data: bytes, via_file: int, scratch: Path) -> None:
    raw = json.dumps(doc, separators=(",", ":")).encode()
    check_random_file(build(raw, data), scratch if via_file == 0 else None)


@fuzz(600)
@given(
    where=st.sampled_from(
        ["alignment", "block_size", "digest", "metadata", "tensors", *range(len(GOOD_DOC["tensors"]))]
    ),
    field=st.sampled_from(["name", "dtype", "shape", "kind", "offset", "length", "digests", "alias", "crypt"]),
    value=json_values,
)
def test_mutated_valid_index(where: Any, field: str, value: Any) -> None:
    doc = json.loads(json.dumps(GOOD_DOC))
    if isinstance(where, int):
        doc["tensors"][where][field] = value
    else:
        doc[where] = value
    raw = json.dumps(doc, separators=(",", ":")).encode()
    pre = Preamble(VERSION, 0, 0, len(raw), DOFF, len(GOOD), hashlib.sha256(raw).digest())
    if PREAMBLE_SIZE + len(raw) > DOFF:
        return
    check_random_file(pre.encode() + raw + b" " * (DOFF - PREAMBLE_SIZE - len(raw)) + GOOD[DOFF:])


@fuzz(300)
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_random_index_bytes(raw: bytes) -> None:
    check_random_file(build(raw, b"\0" * 16))


def test_magic_prefix_alone() -> None:
    for n in range(len(MAGIC) + 1):
        with pytest.raises(TruncatedFileError):
            read_index(BytesSource(MAGIC[:n]))
