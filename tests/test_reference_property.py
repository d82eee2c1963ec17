"""Our safetensors and upstream-tensorizer readers against the reference libraries, property-based.

For valid files and files mutated at random (a byte flipped or set, bytes inserted or deleted, truncation,
the header length rewritten): any file the reference refuses, we refuse with a typed error; any file both
accept gives identical tensors (names, dtypes, shapes, bytes). Being stricter than the reference is allowed.
Upstream files are handed to ``tensorizer`` only after we accept them (then their sizes are sane), so a
hostile size cannot make the reference allocate without bound.
"""

from __future__ import annotations

import io
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import BytesSource
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_tensorizer import TensorDeserializer
from hf_tensorizer.errors import TensorizerError

st_torch = pytest.importorskip("safetensors.torch")
tensorizer = pytest.importorskip("tensorizer")

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore")]
BOUNDED = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))  # fmt: skip

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int16, torch.int64, torch.uint8, torch.bool]


@st.composite
def state_dicts(draw: Any) -> dict[str, torch.Tensor]:
    n = draw(st.integers(1, 4))
    names = draw(st.lists(st.text("abcxyz.", min_size=1, max_size=6), min_size=n, max_size=n, unique=True))
    out = {}
    for i, name in enumerate(names):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        g = torch.Generator().manual_seed(i)
        raw = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8, generator=g)
        t = raw.view(dtype).reshape(shape) if raw.numel() else torch.empty(shape, dtype=dtype)
        out[name] = t if dtype != torch.bool else t.view(torch.uint8).remainder(2).bool()
    return out


@st.composite
def mutations(draw: Any) -> tuple[str, int, int]:
    kind = draw(st.sampled_from(["none", "flip", "set", "insert", "delete", "truncate", "header_length"]))
    return kind, draw(st.integers(0, 1 << 16)), draw(st.integers(0, 255))


def mutate(data: bytes, m: tuple[str, int, int]) -> bytes:
    kind, pos, value = m
    at = pos % (len(data) + 1)
    if kind == "flip" and data:
        at %= len(data)
        return data[:at] + bytes([data[at] ^ (1 << (value % 8))]) + data[at + 1 :]
    if kind == "set" and data:
        at %= len(data)
        return data[:at] + bytes([value]) + data[at + 1 :]
    if kind == "insert":
        return data[:at] + bytes([value]) * (1 + value % 9) + data[at:]
    if kind == "delete":
        return data[:at] + data[at + 1 + value % 9 :]
    if kind == "truncate":
        return data[:at]
    if kind == "header_length" and len(data) >= 8:
        n = struct.unpack_from("<Q", data)[0]
        return struct.pack("<Q", max(0, n + value - 128)) + data[8:]
    return data


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return a.numel() == 0 or torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def ours(data: bytes) -> dict[str, torch.Tensor] | TensorizerError:
    try:
        with TensorDeserializer(BytesSource(data)) as d:
            return dict(d)
    except TensorizerError as exc:  # anything else is a bug and fails the test
        return exc


def assert_identical(mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(mine) == sorted(ref)
    for k, v in ref.items():
        assert same(mine[k], v), k


@BOUNDED
@given(sd=state_dicts(), m=mutations())
def test_safetensors_against_the_reference(sd: dict[str, torch.Tensor], m: tuple[str, int, int]) -> None:
    data = mutate(st_torch.save(sd), m)
    mine = ours(data)
    try:
        ref = st_torch.load(data)
    except Exception:  # the reference refuses (SafetensorError, or a Python error on a bad header)
        event("refused by the reference")
        assert isinstance(mine, TensorizerError), "the reference refuses this file, we loaded it"
        return
    if isinstance(mine, TensorizerError):
        event("refused by us only (stricter)")
        return
    event("accepted by both")
    assert_identical(mine, ref)


with tempfile.TemporaryDirectory() as _tmp:
    UPSTREAM: list[bytes] = []
    for _i, _sd in enumerate([
        {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "b": torch.arange(5)},
        {"x": torch.randn(7, generator=torch.Generator().manual_seed(1)).half(), "m.y": torch.ones(2, 2).bool(),
         "z": torch.randn(3, generator=torch.Generator().manual_seed(2)).bfloat16()},
    ]):  # fmt: skip
        _s = tensorizer.TensorSerializer(str(Path(_tmp) / f"{_i}.tensors"))
        _s.write_state_dict(_sd)
        _s.close()
        UPSTREAM.append((Path(_tmp) / f"{_i}.tensors").read_bytes())


def upstream_reference(data: bytes) -> dict[str, torch.Tensor]:
    d = tensorizer.TensorDeserializer(io.BytesIO(data), device="cpu", lazy_load=False)
    try:
        return {k: v.clone() for k, v in d.items()}
    finally:
        d.close()


@BOUNDED
@given(which=st.integers(0, len(UPSTREAM) - 1), m=mutations())
def test_upstream_against_the_reference(which: int, m: tuple[str, int, int]) -> None:
    kind = m[0] if m[0] != "header_length" else "set"  # no safetensors-style length field here
    data = mutate(UPSTREAM[which], (kind, m[1] % len(UPSTREAM[which]), m[2]))
    mine = ours(data)
    if isinstance(mine, TensorizerError):
        event("refused by us")  # whatever the reference says, the property holds
        return
    try:
        ref = upstream_reference(data)
    except Exception as exc:
        raise AssertionError(f"tensorizer refuses a file we loaded: {type(exc).__name__}: {exc}") from None
    event("accepted by both")
    assert_identical(mine, ref)


@pytest.mark.parametrize("which", range(2))
def test_unmutated_upstream_files_agree(which: int) -> None:
    mine = ours(UPSTREAM[which])
    assert not isinstance(mine, TensorizerError)
    assert_identical(mine, upstream_reference(UPSTREAM[which]))
