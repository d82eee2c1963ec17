"""The serializer's block pipeline: hashing and sealing on worker threads must not change a byte of the file,
must keep the blocks in file order, bound the blocks in flight, and leave nothing behind when a worker fails."""

from __future__ import annotations

import threading
import time
import zlib
from pathlib import Path

import pytest
import torch

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.engine import digest, writer
from hf_tensorizer.errors import SinkError


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    sd = {f"w{i}": torch.randn(300_000 + 997 * i, generator=g).to(torch.bfloat16) for i in range(6)}
    sd["small"] = torch.arange(5, dtype=torch.int8)  # unaligned neighbours: gaps of zeros between tensors
    sd["i64"] = torch.arange(70_000, dtype=torch.int64)
    sd["empty"] = torch.empty(0)
    return sd


def _save(path: Path, sd: dict[str, torch.Tensor], threaded: bool, monkeypatch: pytest.MonkeyPatch, **kw) -> bytes:
    with monkeypatch.context() as m:
        m.setattr(writer._BlockPipeline, "INLINE_BYTES", 0 if threaded else 1 << 62)
        m.setattr(writer, "_cores", lambda: 4)
        with TensorSerializer(path, block_size=64 << 10, **kw) as s:
            s.write_state_dict(sd)
    return path.read_bytes()


@pytest.mark.parametrize("algorithm", ["crc32", "sha256", "none"])
def test_threaded_save_is_byte_identical_to_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str):
    sd = _state_dict()
    inline = _save(tmp_path / "a.tensors", sd, False, monkeypatch, digest=algorithm)
    threaded = _save(tmp_path / "b.tensors", sd, True, monkeypatch, digest=algorithm)
    assert threaded == inline
    with TensorDeserializer(tmp_path / "b.tensors", verify_hash=algorithm != "none", strategy="pread") as d:
        for k, v in sd.items():
            assert torch.equal(d[k], v), k


def test_threaded_encrypted_save_loads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nacl")
    from hf_tensorizer.crypto import EncryptionKey

    key = EncryptionKey(bytes(range(32)))
    sd = _state_dict()
    _save(tmp_path / "e.tensors", sd, True, monkeypatch, encryption=key)
    with TensorDeserializer(tmp_path / "e.tensors", encryption=key, verify_hash=True) as d:
        for k, v in sd.items():
            assert torch.equal(d[k], v), k


def test_pipeline_keeps_order_and_bounds_blocks_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "_cores", lambda: 4)
    emitted: list[int] = []
    started: list[int] = []
    lock = threading.Lock()

    def fn(name: str, i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.001 * (i % 3))  # later blocks often finish first
        return i

    def emit(name: str, i: int) -> None:
        with lock:
            assert len(started) - len(emitted) <= pipe.window + 1  # submitted, not yet emitted
        emitted.append(i)

    with writer._BlockPipeline(1 << 40, 1 << 20, sealed=False, emit=emit) as pipe:
        assert pipe.workers == 4
        for i in range(200):
            pipe.submit("t", fn, i)
    assert emitted == list(range(200))


def test_a_failing_block_aborts_the_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]

    def flaky(b: memoryview) -> int:
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(5, "hash failed")
        return zlib.crc32(b)

    monkeypatch.setattr(digest, "crc32", flaky)
    monkeypatch.setattr(writer._BlockPipeline, "INLINE_BYTES", 0)
    monkeypatch.setattr(writer, "_cores", lambda: 4)
    dest = tmp_path / "x.tensors"
    with pytest.raises(SinkError, match="hash failed"), TensorSerializer(dest, block_size=64 << 10) as s:
        s.write_state_dict(_state_dict())
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left


def test_small_saves_and_one_core_run_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "_cores", lambda: 8)
    assert writer._BlockPipeline(1 << 20, 1 << 20, sealed=False, emit=print).workers == 0
    assert writer._BlockPipeline(1 << 30, 16 << 20, sealed=False, emit=print).workers == 4
    sealed = writer._BlockPipeline(1 << 30, 4 << 20, sealed=True, emit=print)
    assert sealed.workers == 8 and sealed.window * (4 << 20) <= writer._BlockPipeline.WINDOW_BYTES
    monkeypatch.setattr(writer, "_cores", lambda: 1)
    assert writer._BlockPipeline(1 << 30, 16 << 20, sealed=True, emit=print).workers == 0


def test_crc32_matches_zlib() -> None:
    for n in (0, 1, 4095, 70_001, 1 << 20):
        data = memoryview(bytes(range(256)) * (n // 256 + 1))[:n]
        assert digest.crc32(data) == zlib.crc32(data)
