"""fsspec stores (``memory://`` in process, ``gs://`` on the GCS emulator through gcsfs) and open file objects:
bit-identical round trips through the serializer and deserializer, atomic sinks, typed errors, lazy imports."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from helpers import mixed_state_dict

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.engine.header import read_index
from hf_tensorizer.errors import InvalidURIError, ObjectChangedError, SinkError, SourceError, TruncatedFileError
from hf_tensorizer.sources import open_sink, open_source
from hf_tensorizer.sources.fsspec import FsspecSink, FsspecSource

pytestmark = pytest.mark.timeout(120)

_n = itertools.count()
FAST = {"retries": 2, "backoff": 0.01, "max_backoff": 0.02}


def _reference(tmp_path: Path, sd: dict[str, torch.Tensor]) -> bytes:
    path = tmp_path / f"ref-{next(_n)}.tensors"
    with TensorSerializer(path) as s:
        s.write_state_dict(sd)
    return path.read_bytes()


def _check_load(source: Any, sd: dict[str, torch.Tensor], **options: Any) -> None:
    with TensorDeserializer(source, verify_hash=True, **options) as d:
        assert set(d) == set(sd)
        for k, v in sd.items():
            assert d[k].dtype == v.dtype and torch.equal(d[k], v), k


@pytest.fixture
def memory_root() -> Any:
    root = f"memory://fsspec-test-{next(_n)}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --- round trips ---------------------------------------------------------------------------------------------


def test_memory_round_trip_is_bit_identical(tmp_path: Path, memory_root: str) -> None:
    sd = mixed_state_dict()
    uri = f"{memory_root}/m/model.tensors"
    with TensorSerializer(uri) as s:
        s.write_state_dict(sd)
    fs = fsspec.filesystem("memory")
    assert fs.cat_file(uri) == _reference(tmp_path, sd)
    assert fs.ls(f"{memory_root}/m", detail=False) == [f"/{memory_root[9:]}/m/model.tensors"]  # no temporary left
    _check_load(uri, sd, concurrency=3, part_size=64 << 10)


def test_gcs_round_trip_is_bit_identical(tmp_path: Path, gcs_bucket: tuple[str, dict[str, Any]]) -> None:
    bucket, options = gcs_bucket
    sd = mixed_state_dict()
    uri = f"gs://{bucket}/models/model.tensors"
    with TensorSerializer(uri, storage_options=options) as s:
        s.write_state_dict(sd)
    fs = fsspec.filesystem("gs", **options)
    assert fs.cat_file(uri) == _reference(tmp_path, sd)
    assert read_index(uri, storage_options=options).file_size == fs.size(uri)
    _check_load(uri, sd, storage_options=options, concurrency=4, part_size=64 << 10)
    # gs:// reads 16 MiB at a time unless the caller names a chunk size (fewer GETs: see GCS_CHUNK_BYTES)
    with TensorDeserializer(uri, storage_options=options) as d:
        assert d.chunk_bytes == 16 << 20 and all(torch.equal(d[k], v) for k, v in sd.items())
    with TensorDeserializer(uri, storage_options=options, chunk_bytes=1 << 20) as d:
        assert d.chunk_bytes == 1 << 20


def test_gcs_upload_in_several_chunks(gcs_bucket: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct upload larger than one chunk (resumable upload), then an abort that publishes nothing."""
    bucket, options = gcs_bucket
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    raw = data.numpy().tobytes()
    sink = open_sink(f"gs://{bucket}/big.bin", storage_options=options, block_size=1 << 20)
    assert isinstance(sink, FsspecSink) and sink.direct and not sink.can_rewrite_head
    for i in range(0, len(raw), 700_000):
        sink.write(raw[i : i + 700_000])
    sink.commit()
    fs = fsspec.filesystem("gs", **options)
    assert fs.cat_file(f"gs://{bucket}/big.bin") == raw

    sink = open_sink(f"gs://{bucket}/aborted.bin", storage_options=options, block_size=1 << 20)
    sink.write(raw)  # chunks already went up
    # the emulator answers 501 to cancelling an upload session (gcsfs then retries for ~30 s); real GCS cancels it
    cancelled: list[str] = []
    monkeypatch.setattr(type(sink._file), "discard", lambda f: cancelled.append(f.path))
    sink.abort()
    assert cancelled == [f"{bucket}/aborted.bin"]
    sink.abort()
    fs.invalidate_cache()
    assert not fs.exists(f"gs://{bucket}/aborted.bin")


@pytest.mark.parametrize("kind", ["bytesio", "file"])
def test_seekable_file_object_round_trip(tmp_path: Path, kind: str) -> None:
    sd = mixed_state_dict()
    f: Any = io.BytesIO() if kind == "bytesio" else open(tmp_path / "out.bin", "w+b")  # noqa: SIM115
    with f:
        f.write(b"prefix")  # the object starts where the file object is positioned
        with TensorSerializer(f) as s:
            s.write_state_dict(sd)
        assert not f.closed  # the caller's
        f.seek(6)
        assert f.read() == _reference(tmp_path, sd)
        f.seek(6)
        assert read_index(f).file_size == len(_reference(tmp_path, sd))
        assert f.tell() == 6  # reads leave the position as it was
        _check_load(f, sd)
        assert not f.closed


class WriteOnlyStream(io.RawIOBase):
    """A non-seekable destination (a pipe, a socket)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.chunks.append(bytes(b))
        return len(b)


class ReadOnlyStream(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._f.readinto(b)


def test_non_seekable_streams_round_trip(tmp_path: Path) -> None:
    sd = mixed_state_dict()
    out = WriteOnlyStream()
    sink = open_sink(out)
    assert not sink.can_rewrite_head  # the serializer hashes in a first pass
    with TensorSerializer(out) as s:
        s.write_state_dict(sd)
    data = b"".join(out.chunks)
    assert data == _reference(tmp_path, sd)
    src = open_source(ReadOnlyStream(data))
    assert src.size == len(data) and src.fileno() is not None  # spooled to a temporary file
    src.close()
    _check_load(ReadOnlyStream(data), sd)


def test_file_object_errors(tmp_path: Path) -> None:
    buf = io.BytesIO(b"x" * 100)
    buf.seek(0, 2)
    with pytest.raises(Exception, match=r"seek\(0\)"):
        open_source(buf)
    with pytest.raises(Exception, match="binary mode"):
        open_source(open(tmp_path / "t.txt", "w+"))  # noqa: SIM115
    with pytest.raises(Exception, match="unknown options"):
        open_source(io.BytesIO(b"abc"), concurrency=2)
    with pytest.raises(TruncatedFileError):
        open_source(io.BytesIO(b"abc")).read(1, 3)
    sink = open_sink(buf)  # abort truncates back to where writing started
    sink.write(b"more")
    sink.abort()
    assert buf.getvalue() == b"x" * 100


# --- typed errors --------------------------------------------------------------------------------------------


def test_missing_objects_and_unknown_schemes(memory_root: str, gcs_bucket: tuple[str, dict[str, Any]]) -> None:
    with pytest.raises(SourceError, match="no such object"):
        open_source(f"{memory_root}/missing.bin")
    bucket, options = gcs_bucket
    with pytest.raises(SourceError, match="no such object"):
        open_source(f"gs://{bucket}/missing.bin", storage_options=options)
    fsspec.filesystem("memory").pipe_file(f"{memory_root}/d/x", b"1")
    with pytest.raises(SourceError, match="directory"):
        open_source(f"{memory_root}/d")
    with pytest.raises(InvalidURIError):
        open_source("nope://b/k")
    with pytest.raises(InvalidURIError):
        open_sink("nope://b/k")
    with pytest.raises(SourceError, match=r"(?i)install"):  # the protocol's package is not installed
        open_source("dropbox://folder/x.bin")


class LyingMemoryFS(MemoryFileSystem):
    """Reports a size larger than the stored bytes (a hostile or inconsistent store)."""

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        info = super().info(path, **kwargs)
        return {**info, "size": info["size"] + 1000} if info["type"] == "file" else info


def test_hostile_sizes_raise_typed_errors(memory_root: str) -> None:
    fs = fsspec.filesystem("memory")
    uri = f"{memory_root}/obj.bin"
    fs.pipe_file(uri, bytes(range(256)) * 100)
    lying = LyingMemoryFS(skip_instance_cache=True)
    src = FsspecSource(uri, filesystem=lying, **FAST)
    assert src.size == 25_600 + 1000
    with pytest.raises(SourceError):  # the store ends before the size it promised: retried, then a clear error
        src.read(25_000, 1000)
    src.close()
    with pytest.raises(SourceError):  # a deserializer over it fails with a typed error, never wrong tensors
        TensorDeserializer(uri, filesystem=lying, **FAST)


def test_replaced_or_deleted_object_is_detected(memory_root: str) -> None:
    fs = fsspec.filesystem("memory")
    uri = f"{memory_root}/obj.bin"
    fs.pipe_file(uri, b"a" * 5000)
    with open_source(uri) as src:
        fs.pipe_file(uri, b"b" * 3000)  # shorter: a size change
        with pytest.raises(ObjectChangedError):
            src.read(0, 10)
    with open_source(uri) as src:
        fs.rm(uri)
        with pytest.raises(ObjectChangedError):
            src.read(0, 10)
    fs.pipe_file(uri, b"c" * 10)
    with open_source(uri, verify_version=False) as src:  # opt-out: no metadata request per read
        assert src.read(0, 10) == b"c" * 10


def test_sink_abort_and_failure_leave_nothing(memory_root: str) -> None:
    fs = fsspec.filesystem("memory")
    uri = f"{memory_root}/out/model.tensors"
    sink = open_sink(uri)
    assert isinstance(sink, FsspecSink) and not sink.direct and sink.can_rewrite_head
    sink.write(b"partial")
    assert not fs.exists(uri)  # invisible until commit
    sink.abort()
    assert fs.find(memory_root) == []
    with pytest.raises(SinkError):
        sink.write(b"x")

    class Boom(torch.nn.Module):
        def state_dict(self, *a: Any, **k: Any) -> Any:
            raise RuntimeError("boom")

    sd = mixed_state_dict()
    s = TensorSerializer(uri)
    s.write_state_dict(sd)
    real_write = FsspecSink.write
    calls = itertools.count()

    def failing_write(self: FsspecSink, data: Any) -> None:
        if next(calls) == 3:
            raise OSError("disk on fire")
        real_write(self, data)

    FsspecSink.write = failing_write  # type: ignore[method-assign]
    try:
        with pytest.raises(SinkError):
            s.close()
    finally:
        FsspecSink.write = real_write  # type: ignore[method-assign]
    assert fs.find(memory_root) == []  # no object, no temporary


def test_storage_options_reach_the_filesystem(tmp_path: Path) -> None:
    """``storage_options`` are the protocol's own (here: the wrapped protocol and cache folder of simplecache)."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file("memory://so-test/x.bin", b"0123456789" * 1000)
    uri = "simplecache::memory://so-test/x.bin"
    options = {"simplecache": {"cache_storage": str(tmp_path / "cache")}}
    with open_source(uri, storage_options=options) as src:
        assert src.read(5, 10) == b"5678901234"
    fs.rm("memory://so-test", recursive=True)


def test_fsspec_is_imported_only_for_its_schemes() -> None:
    probe = (
        "import sys; from hf_tensorizer.sources import scheme_of, open_source; import io;"
        "scheme_of('s3://b/k'); scheme_of('/tmp/x'); scheme_of('hf://o/r/x'); open_source(io.BytesIO(b'x')).close();"
        "assert 'fsspec' not in sys.modules, 'fsspec imported';"
        "scheme_of('gs://b/k'); assert 'fsspec' in sys.modules; assert 'gcsfs' not in sys.modules"
    )
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=root, timeout=60)


def test_docs_example_runs_verbatim() -> None:
    """The python block of docs/remote.md's "fsspec stores" section."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "remote.md").read_text()
    section = text[text.index("\n## fsspec stores\n") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match
    try:
        exec(compile(match.group(1), "docs/remote.md", "exec"), {"__name__": "docs_example"})
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists("memory://models"):
            fs.rm("memory://models", recursive=True)


# --- GCS: one streamed GET (sources/gcs_stream.py) ----------------------------------------------------------------


def _read_threads(src: Any, data: bytes, piece: int, order: list[int]) -> bytes:
    from concurrent.futures import ThreadPoolExecutor

    buf = bytearray(len(data))
    view = memoryview(buf)
    with ThreadPoolExecutor(6) as ex:
        list(ex.map(lambda o: src.read_into(o, view[o : o + piece]), order))
    return bytes(buf)


@pytest.mark.parametrize("order", ["file", "shuffled"])
def test_gcs_stream_serves_every_byte(gcs_bucket: tuple[str, dict[str, Any]], order: str) -> None:
    """A gs:// source reads through gcsfs's session with streamed bodies (sources/gcs_stream.py): forced into one
    sequential GET, every byte is right in file order and out of it (reads behind the stream get their own GET).
    The tuner never picks the stream for it on its own (the emulator serves one request at a time)."""
    import random

    bucket, options = gcs_bucket
    data = random.Random(3).randbytes(6 * (1 << 20) + 777)
    fsspec.filesystem("gs", **options).pipe_file(f"{bucket}/s.bin", data)
    piece = (1 << 20) + 7
    offsets = list(range(0, len(data), piece))
    if order == "shuffled":
        random.Random(1).shuffle(offsets)
    with open_source(f"gs://{bucket}/s.bin", storage_options=options) as src:
        assert src._streams and not src._tuner.can_stream  # type: ignore[attr-defined]
        src._force("stream", "test")  # type: ignore[attr-defined]
        assert _read_threads(src, data, piece, offsets) == data
        assert src.tuning["mode"] == "stream"  # type: ignore[attr-defined]
    fsspec.filesystem("memory").pipe_file("/nostream/x.bin", b"x")
    with open_source("memory://nostream/x.bin") as mem:  # cat_file only: whole ranges
        assert not mem._streams  # type: ignore[attr-defined]


def test_gcs_stream_never_mixes_a_replaced_object(gcs_bucket: tuple[str, dict[str, Any]]) -> None:
    bucket, options = gcs_bucket
    fs = fsspec.filesystem("gs", **options)
    old, new = b"a" * 300_000, b"b" * 300_000
    fs.pipe_file(f"{bucket}/r.bin", old)
    with open_source(f"gs://{bucket}/r.bin", storage_options=options) as src:
        assert src.read(0, 10) == old[:10]
        src._force("stream", "test")  # type: ignore[attr-defined]
        fs.pipe_file(f"{bucket}/r.bin", new)  # a new generation
        with pytest.raises(ObjectChangedError):  # the stream's GET checks the version it opens on
            src.read(10, 1000)
    with open_source(f"gs://{bucket}/r.bin", storage_options=options) as fresh:
        fresh._force("stream", "test")  # type: ignore[attr-defined]
        assert fresh.read(0, 300_000) == new


def test_gcs_object_overwritten_mid_read_is_a_typed_error(gcs_bucket: tuple[str, dict[str, Any]]) -> None:
    """Reads in flight on 6 threads when the object is overwritten (the emulator ignores the generation pin, so
    only the version lookups can tell): some read raises ObjectChangedError, and every read that returned holds
    the old bytes, never the new ones or a mix. Lookups are shared: fewer than one per read."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    bucket, options = gcs_bucket
    fs = fsspec.filesystem("gs", **options)
    piece = 1 << 20
    old = random.Random(8).randbytes(24 * piece)
    new = bytes(255 - b for b in old[: 8 * piece]) * 3  # same size: only the generation tells
    fs.pipe_file(f"{bucket}/mid.bin", old)
    done, lock, replaced = [0], threading.Lock(), threading.Event()
    got: dict[int, bytes] = {}

    with open_source(f"gs://{bucket}/mid.bin", storage_options=options) as src:

        def read(o: int) -> None:
            if o >= 12 * piece:
                replaced.wait(30)  # the last half of the reads starts once the object was replaced
            data = src.read(o, piece)
            with lock:
                got[o] = data
                done[0] += 1
                if done[0] == 6:  # 6 reads returned: overwrite the object while the next ones are in flight
                    fs.pipe_file(f"{bucket}/mid.bin", new)
                    replaced.set()

        with ThreadPoolExecutor(6) as ex:
            futures = [ex.submit(read, o) for o in range(0, len(old), piece)]
            errors = [f.exception() for f in futures]
        lookups = src._confirmations.lookups  # type: ignore[attr-defined]
    assert any(isinstance(e, ObjectChangedError) for e in errors), errors
    assert all(e is None or isinstance(e, ObjectChangedError) for e in errors), errors
    assert got and all(data == old[o : o + piece] for o, data in got.items())  # never new or mixed bytes
    assert lookups >= 1


def test_one_lookup_vouches_for_every_read_completed_before_it(memory_root: str) -> None:
    """Reads that finish while a lookup runs wait for the next one; one lookup then serves all of them."""
    from hf_tensorizer.sources.fsspec import _Confirmations

    gate, entered, calls = threading.Event(), threading.Event(), [0]

    def check() -> None:
        calls[0] += 1
        if calls[0] == 1:
            entered.set()
            gate.wait(10)  # the first lookup is slow: the other reads finish meanwhile

    conf = _Confirmations(check)
    first = threading.Thread(target=conf.confirm)
    first.start()
    entered.wait(10)
    others = [threading.Thread(target=conf.confirm) for _ in range(8)]
    for t in others:
        t.start()
    gate.set()
    for t in [first, *others]:
        t.join(10)
    assert calls[0] == 2  # the first lookup started before the 8 reads finished: one more lookup serves them all

    def changed() -> None:
        raise ObjectChangedError("changed")

    with pytest.raises(ObjectChangedError):
        _Confirmations(changed).confirm()


def _many_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"t{i}": torch.randn(64, 64, generator=g) for i in range(24)}  # 16 KiB each


def test_a_load_confirms_its_reads_once_at_the_end(tmp_path: Path, memory_root: str) -> None:
    """Inside a load (``Source.deferred_checks``) the engine's reader threads return without a version lookup and
    one lookup at the end vouches for every read: a load of 24 chunks makes a handful of lookups, not one a read,
    and its tensors are bit-identical."""
    sd = _many_tensors()
    uri = f"{memory_root}/m.tensors"
    fsspec.filesystem("memory").pipe_file(uri, _reference(tmp_path, sd))
    src = FsspecSource(uri)
    reads = [0]
    real = src.fs.cat_file
    src.fs.cat_file = lambda *a, **k: reads.__setitem__(0, reads[0] + 1) or real(*a, **k)  # type: ignore[method-assign]
    with TensorDeserializer(src, device="cpu", chunk_bytes=16 << 10, num_readers=4) as d:
        got = dict(d)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert reads[0] >= 24
    assert src._confirmations.lookups <= 3  # the header's reads and the load's one  # type: ignore[attr-defined]


def test_an_object_replaced_during_a_load_fails_the_load(tmp_path: Path, memory_root: str) -> None:
    """With the checks deferred to the end of the load, a replacement after some reads still fails the load with
    ObjectChangedError and hands out no tensors."""
    sd = _many_tensors()
    uri = f"{memory_root}/m.tensors"
    fs = fsspec.filesystem("memory")
    data = _reference(tmp_path, sd)
    fs.pipe_file(uri, data)
    src = FsspecSource(uri)
    reads, real = [0], src.fs.cat_file

    def cat_file(*a: Any, **k: Any) -> bytes:
        out = real(*a, **k)
        reads[0] += 1
        if reads[0] == 6:  # mid-load: the same name now holds other bytes (another size: a new version)
            fs.pipe_file(uri, data + b"\0" * 4096)
        return out

    src.fs.cat_file = cat_file  # type: ignore[method-assign]
    with pytest.raises(ObjectChangedError):
        TensorDeserializer(src, device="cpu", chunk_bytes=16 << 10, num_readers=4)
    assert reads[0] >= 6


def test_only_the_loads_own_threads_defer_their_checks(memory_root: str) -> None:
    """A span covers the thread that opened it and threads started in a copy of its context (the engine's
    readers); a read from any other thread meanwhile is confirmed before it returns, as outside a span."""
    import contextvars

    uri = f"{memory_root}/o.bin"
    fsspec.filesystem("memory").pipe_file(uri, bytes(range(256)) * 64)
    src = FsspecSource(uri)
    with src.deferred_checks():
        src.read(0, 100)
        worker = threading.Thread(target=contextvars.copy_context().run, args=(src.read, 100, 100))
        worker.start()
        worker.join(10)
        assert src._confirmations.lookups == 0  # type: ignore[attr-defined]
        stranger = threading.Thread(target=src.read, args=(200, 100))
        stranger.start()
        stranger.join(10)
        assert src._confirmations.lookups == 1  # type: ignore[attr-defined]
    assert src._confirmations.lookups == 2  # type: ignore[attr-defined]  # the span's own, at its end
    src.close()
