"""CPU strategy: ``auto`` maps plain local files zero-copy and reads everything else in parallel; mapped
tensors are private copies-on-write that outlive the deserializer, the file name and the file itself."""

from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import struct
from pathlib import Path

import pytest
import torch
from helpers import assert_same, flip_byte, mapped_fraction, random_tensor, write_file
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.crypto import EncryptionKey
from hf_tensorizer.engine.header import read_index
from hf_tensorizer.engine.mapping import FileMapping, is_zero_copy
from hf_tensorizer.errors import HashMismatchError, UsageError


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "w": random_tensor(torch.float32, (300, 70), seed),
        "h": random_tensor(torch.bfloat16, (5000,), seed + 1),
        "i": random_tensor(torch.int64, (9,), seed + 2),
        "e": torch.empty(0),
        "big": random_tensor(torch.float16, (3 * 4096 + 5,), seed + 3),
    }


@pytest.fixture
def plain(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _tensors()
    path = tmp_path / "m.tensors"
    write_file(path, tensors, block_size=4096)
    return path, tensors


def _check(d: TensorDeserializer, tensors: dict[str, torch.Tensor]) -> None:
    for name, expected in tensors.items():
        assert_same(d[name], expected, name)


def test_auto_maps_a_plain_local_file(plain: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = plain
    with TensorDeserializer(path) as d:
        assert d.metrics.strategy == "mmap"
        _check(d, tensors)
    with TensorDeserializer(path, dtype=torch.float32, filter=["w", "i"]) as d:  # nothing to cast: still mapped
        assert d.metrics.strategy == "mmap"
    with TensorDeserializer(path, lazy=True) as d:
        assert_same(d["w"], tensors["w"])
        assert d.metrics.strategy == "mmap"


def test_auto_reads_a_cold_file_through_the_page_cache_and_maps_it(tmp_path: Path) -> None:
    """Out of the page cache, auto still maps, after reading the pages in (docs/benchmarks.md); every page is then
    cached and mapped, and the next load finds the file warm. (8 MiB: reading the header must not make the file
    count as cached.)"""
    from hf_tensorizer.engine import pagecache

    tensors = {**_tensors(), "large": random_tensor(torch.float32, (2048, 1024), 9)}
    path = tmp_path / "large.tensors"
    write_file(path, tensors)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped
    pagecache.evict(path)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        resident = pagecache.resident_fraction(fd, size)
        if resident is None or resident >= 0.5:
            pytest.skip("this filesystem keeps the file cached (tmpfs?): cannot make it cold")
        with TensorDeserializer(path, num_readers=3) as d:
            assert d.metrics.strategy == "mmap"
            assert d.metrics.resident is not None and d.metrics.resident < 0.5
            assert d.metrics.stages.read > 0
            # before anything touches it, every page is in the page cache and mapped into this process
            assert mapped_fraction(d["large"]) == 1.0
            assert pagecache.resident_fraction(fd, size, samples=10_000, window=4096) == 1.0
            _check(d, tensors)
        with TensorDeserializer(path) as d:  # the load above cached it
            assert d.metrics.strategy == "mmap"
            assert d.metrics.resident == 1.0 and d.metrics.stages.read == 0
    finally:
        os.close(fd)


def test_read_through_fills_the_page_cache_before_mapping(tmp_path: Path) -> None:
    """The read step alone caches a piece without mapping it (sized reads, no faults); the whole call maps every
    page of the entries and leaves the bytes right; a file that shrank since it was mapped is a typed error."""
    from hf_tensorizer.engine import pagecache
    from hf_tensorizer.errors import ObjectChangedError

    tensors = {"a": random_tensor(torch.float32, (512, 1024), 1), "b": random_tensor(torch.int8, (3 << 20,), 2)}
    path = tmp_path / "m.tensors"
    write_file(path, tensors)
    index = read_index(path)
    pagecache.evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if pagecache.resident_fraction(fd, size, samples=10_000, window=4096) > 0.5:
            pytest.skip("this filesystem keeps the file cached (tmpfs?): cannot make it cold")
        m = FileMapping(fd, size)
        a, b = index.tensors["a"], index.tensors["b"]
        start = a.offset // 4096 * 4096
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            m._read_into_cache(fd, devnull, start, 1 << 20)
        finally:
            os.close(devnull)
        assert _resident(fd, start, 1 << 20) == 1.0  # that piece, read (the kernel may read ahead of it)
        assert mapped_fraction(m.base[start : start + (1 << 20)]) == 0.0  # and not mapped
        m.read_through(fd, [a, b], threads=4, piece_bytes=300_000)  # pieces round up to whole pages
        for e in (a, b):
            assert mapped_fraction(m.base[e.offset : e.offset + e.length]) == 1.0
            assert_same(m.tensor(e), tensors[e.name])
        os.truncate(path, b.offset + 4096)
        pagecache.evict(path)
        with pytest.raises(ObjectChangedError, match="truncated"):
            m.read_through(fd, [b], threads=2, piece_bytes=1 << 20)
        with pytest.raises(ObjectChangedError, match="truncated"):  # the warm path: mapping pages past the end
            m.populate([b], threads=2)
    finally:
        os.close(fd)


@pytest.mark.parametrize("refusal", ["unavailable", "EINVAL"])
def test_read_through_without_sendfile_faults_pieces_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    """Where sendfile to /dev/null is refused (not Linux), each piece is read by faulting it in; learnt once."""
    import errno

    from hf_tensorizer.engine import mapping, pagecache

    tensors = {"a": random_tensor(torch.float32, (512, 1024), 1), "b": random_tensor(torch.int8, (3 << 20,), 2)}
    path = tmp_path / "m.tensors"
    write_file(path, tensors)
    index = read_index(path)
    pagecache.evict(path)
    calls: list[int] = []
    if refusal == "unavailable":
        monkeypatch.setattr(mapping, "_SENDFILE_SUPPORTED", [False])
    else:
        monkeypatch.setattr(mapping, "_SENDFILE_SUPPORTED", [True])

        def refuse(*args: object) -> int:
            calls.append(1)
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(mapping.os, "sendfile", refuse)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = FileMapping(fd, os.fstat(fd).st_size)
        m.read_through(fd, list(index.tensors.values()), threads=1, piece_bytes=1 << 20)
        for e in index.tensors.values():
            assert mapped_fraction(m.base[e.offset : e.offset + e.length]) == 1.0
            assert_same(m.tensor(e), tensors[e.name])
    finally:
        os.close(fd)
    assert mapping._SENDFILE_SUPPORTED == [False]
    assert len(calls) == (1 if refusal == "EINVAL" else 0)  # refused once, then never asked again


def _resident(fd: int, start: int, length: int) -> float:
    """The share of the file's pages in ``[start, start + length)`` in the page cache (every page looked at)."""
    from hf_tensorizer.engine.pagecache import _libc

    addr = _libc.mmap(None, start + length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    try:
        vec = (ctypes.c_ubyte * (length // 4096))()
        assert _libc.mincore(addr + start, length, vec) == 0
        return sum(v & 1 for v in vec) / len(vec)
    finally:
        _libc.munmap(addr, start + length)


def test_auto_reads_in_parallel_when_it_cannot_map(plain: tuple[Path, dict[str, torch.Tensor]], http_server) -> None:
    path, tensors = plain
    with TensorDeserializer(path, strategy="pread") as d:  # the parallel-read path, forced
        assert d.metrics.strategy == "pread"
        _check(d, tensors)
        assert d["w"].untyped_storage().nbytes() == d["w"].numel() * 4  # a tensor of its own, not a view
    with TensorDeserializer(path, dtype=torch.float16) as d:  # a cast: the file's bytes are not the tensors
        assert d.metrics.strategy == "pread"
        assert_same(d["w"], tensors["w"].to(torch.float16))
    url = http_server.write("m.tensors", path.read_bytes())
    with TensorDeserializer(url) as d:  # remote
        assert d.metrics.strategy == "pread"
        _check(d, tensors)
    key = EncryptionKey.generate()
    enc = path.with_name("enc.tensors")
    with TensorSerializer(enc, encryption=key) as s:
        s.write_state_dict(tensors)
    with TensorDeserializer(enc, encryption=key) as d:  # encrypted: decrypted copies
        assert d.metrics.strategy == "pread"
        _check(d, tensors)


def test_explicit_mmap_is_checked(plain: tuple[Path, dict[str, torch.Tensor]], http_server) -> None:
    path, tensors = plain
    with TensorDeserializer(path, strategy="mmap") as d:
        assert d.metrics.strategy == "mmap"
        _check(d, tensors)
    url = http_server.write("m2.tensors", path.read_bytes())
    for source, kw in (
        (url, {"strategy": "mmap"}),
        (url, {"mmap": True}),
        (path, {"strategy": "mmap", "device": "meta"}),
    ):
        with pytest.raises(UsageError, match="mmap"):
            TensorDeserializer(source, **kw)


def test_write_to_a_parameter_never_reaches_the_file(plain: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = plain
    before = path.read_bytes()
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.empty(300, 70, device="meta"))
    with TensorDeserializer(path, filter=["w"]) as d:
        assert d.metrics.strategy == "mmap"
        d.load_into_module(model)
    with torch.no_grad():
        model.w.fill_(7.0)  # copy-on-write: this process's pages only
    assert path.read_bytes() == before
    with TensorDeserializer(path) as again:  # a second mapping of the file sees the file, not the write
        assert_same(again["w"], tensors["w"])
    assert bool((model.w.detach() == 7.0).all())


def test_mapped_tensors_outlive_deserializer_name_and_file(tmp_path: Path) -> None:
    path = tmp_path / "m.tensors"
    old, new = _tensors(0), _tensors(50)
    write_file(path, old)
    d = TensorDeserializer(path)
    loaded = dict(d)
    assert d.metrics.strategy == "mmap"
    d.close()
    del d
    gc.collect()
    other = tmp_path / "other.tensors"
    write_file(other, new)
    os.replace(other, path)  # an atomic update of the file name: the mapping keeps the old inode
    gc.collect()
    for name in old:
        assert_same(loaded[name], old[name], name)
    with TensorDeserializer(path) as fresh:  # the name now serves the new file
        assert_same(fresh["w"], new["w"])
        second = dict(fresh)
    os.unlink(path)
    gc.collect()
    for name in new:
        assert_same(second[name], new[name], name)
        assert_same(loaded[name], old[name], name)


def test_verify_hash_on_mapped_tensors(plain: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = plain
    with TensorDeserializer(path, verify_hash=True, num_readers=3) as d:
        assert d.metrics.strategy == "mmap"
        _check(d, tensors)
    flip_byte(path, read_index(path).tensors["big"].offset + 4096 + 7)
    with pytest.raises(HashMismatchError, match="big"):
        TensorDeserializer(path, verify_hash=True)
    with pytest.raises(HashMismatchError, match="big"):
        TensorDeserializer(path, verify_hash=True, strategy="pread")


def _unaligned_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A valid safetensors file whose header is not padded: float tensors start at odd offsets."""
    tensors = {
        "a_u8": random_tensor(torch.uint8, (3,), 1),
        "b_f32": random_tensor(torch.float32, (5000,), 2),
        "c_bf16": random_tensor(torch.bfloat16, (7, 3), 3),
        "d_f64": random_tensor(torch.float64, (11,), 4),
    }
    header, blobs, pos = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dt = {torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64"}[t.dtype]
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    if (8 + len(head)) % 2 == 0:
        head += b" "  # JSON allows trailing spaces: the data starts at an odd offset
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return tensors


def test_unaligned_safetensors_tensors_load_correctly(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    tensors = _unaligned_safetensors(path)
    index = read_index(path)
    assert [n for n, e in index.tensors.items() if not is_zero_copy(e)], "the test needs unaligned tensors"
    for kw in ({}, {"strategy": "mmap"}, {"strategy": "pread"}, {"lazy": True}):
        with TensorDeserializer(path, **kw) as d:
            for name, expected in tensors.items():
                got = d[name]
                assert_same(got, expected, name)
                assert got.data_ptr() % got.element_size() == 0, name
            assert d.metrics.strategy == kw.get("strategy", "mmap")


def test_mapping_views_aligned_and_copies_unaligned(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    tensors = _unaligned_safetensors(path)
    index = read_index(path)
    with open(path, "rb") as f:
        mapping = FileMapping(f.fileno(), index.file_size)
    mapping.populate(list(index.tensors.values()), threads=2)
    base = mapping.base.data_ptr()
    for name, e in index.tensors.items():
        t = mapping.tensor(e)
        assert_same(t, tensors[name], name)
        inside = base <= t.data_ptr() < base + index.file_size
        assert inside == is_zero_copy(e), name


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_populate_in_parallel_covers_every_page(tmp_path: Path, threads: int) -> None:
    tensors = {f"t{i}": random_tensor(torch.float32, (n,), i) for i, n in enumerate((1, 70000, 3, 2_000_000, 5))}
    path = tmp_path / "p.tensors"
    write_file(path, tensors)
    with TensorDeserializer(path, num_readers=threads) as d:
        assert d.metrics.strategy == "mmap" and d.metrics.threads == threads
        for name, expected in tensors.items():
            assert_same(d[name], expected, name)


transformers = pytest.importorskip("transformers")


@pytest.mark.usefixtures("hf_enabled")
@pytest.mark.parametrize("device_map", [None, "cpu"])
def test_from_pretrained_maps_on_cpu(tmp_path: Path, device_map: str | None) -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "art", tensorized=True)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "art", device_map=device_map)
    ids = torch.tensor([[3, 17, 5, 42, 8, 61, 2, 9]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, loaded(ids).logits)
    assert [m.strategy for m in loaded.hf_tensorizer_metrics] == ["mmap"]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    spans=st.lists(st.tuples(st.integers(0, 50), st.integers(1, 3 * 4096 + 7)), min_size=1, max_size=12),
    parts=st.integers(1, 8),
)
def test_split_cuts_only_on_pages(spans: list[tuple[int, int]], parts: int) -> None:
    """The ranges the populate threads get start on a page (madvise refuses anything else, found by CI) and cover
    exactly the tensors' pages."""
    from hf_tensorizer.engine.mapping import PAGE, _page_ranges, _split

    class Entry:
        def __init__(self, offset: int, length: int) -> None:
            self.offset, self.length = offset, length

    entries, at = [], 0
    for gap_pages, length in spans:
        at += gap_pages * PAGE + (at % 64)  # tensors at 64-byte or page offsets, as the writer places them
        entries.append(Entry(at, length))
        at += length
    ranges = _page_ranges(entries)  # type: ignore[arg-type]
    groups = _split(ranges, parts)
    pieces = [p for g in groups for p in g]
    assert all(start % PAGE == 0 for start, _ in pieces)
    covered = sorted(pieces)
    assert sum(n for _, n in covered) == sum(n for _, n in ranges)
    assert _merge_adjacent(covered) == _merge_adjacent(ranges)


def _merge_adjacent(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, n in ranges:
        if out and start == out[-1][1]:
            out[-1][1] += n
        else:
            out.append([start, start + n])
    return [(s, e - s) for s, e in out]


# --- pre-faulting the memory a read fills ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 300_000), length=st.integers(0, 300_000), seed=st.integers(0, 2**16))
def test_populate_for_write_never_changes_a_byte(start: int, length: int, seed: int) -> None:
    """Populating widens the range to whole pages but writes nothing: inside and around it every byte stays."""
    from hf_tensorizer.engine.memory import host_view, populate_for_write

    data = torch.randint(0, 256, (600_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    before = data.clone()
    populate_for_write(host_view(data)[start : start + length])
    assert torch.equal(data, before)


def test_populate_for_write_faults_the_pages_in_ahead_of_the_copy() -> None:
    """After it, filling fresh memory takes (almost) no page faults: they were taken in one call instead of one per
    page inside the copy, which is what makes reads into new tensors faster (docs/benchmarks.md)."""
    import mmap
    import resource

    from hf_tensorizer.engine import memory

    pages = 2048
    faults = {}
    for populate in (False, True):
        region = mmap.mmap(-1, pages * mmap.PAGESIZE)  # fresh anonymous memory, no page present yet
        view = memoryview(region)
        if populate and not memory.populate_for_write(view):
            pytest.skip("MADV_POPULATE_WRITE needs Linux >= 5.14")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for page in range(pages):
            region[page * mmap.PAGESIZE] = 1
        faults[populate] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        view.release()
        region.close()
    assert faults[False] >= pages * 0.9
    assert faults[True] < pages * 0.05


def _child_sum(q: object, out: object) -> None:
    t = q.get()  # type: ignore[attr-defined]
    out.put((t.untyped_storage().nbytes(), t.reshape(-1).view(torch.uint8).numpy().tobytes()))  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["mmap", "lazy", "pread", "remote"])
def test_each_loaded_tensor_owns_a_storage_of_exactly_its_bytes(tmp_path: Path, http_server, how: str) -> None:
    """Issue 23: a loaded tensor's storage is its own bytes on every path, mapped ones included (zero-copy kept):
    ``torch.save`` of one small tensor writes about its own size, pickling to another process and
    ``share_memory_()`` move its bytes only."""
    import io
    import multiprocessing

    tensors = {**_tensors(), "four": torch.arange(4, dtype=torch.float32)}
    path = tmp_path / "m.tensors"
    write_file(path, tensors, block_size=4096)
    kw = {"lazy": True} if how == "lazy" else {"strategy": "pread"} if how == "pread" else {}
    source = http_server.write("own.tensors", path.read_bytes()) if how == "remote" else path
    with TensorDeserializer(source, **kw) as d:
        got = {n: d[n] for n in tensors}
        assert d.metrics.strategy == ("pread" if how in ("pread", "remote") else "mmap")
        mapping = d._mapping
    for name, t in got.items():
        assert_same(t, tensors[name], name)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        assert t.storage_offset() == 0, name
        if mapping is not None and t.numel():  # zero-copy: the data is the mapping's
            assert mapping.address <= t.data_ptr() < mapping.address + mapping.size, name
    buf = io.BytesIO()
    torch.save(got["four"], buf)
    assert len(buf.getvalue()) < 2000, len(buf.getvalue())  # safetensors' load_file: 1,577 bytes
    ctx = multiprocessing.get_context("fork")
    q, out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_child_sum, args=(q, out))
    child.start()
    q.put(got["w"])
    assert out.get(timeout=60) == (300 * 70 * 4, tensors["w"].reshape(-1).view(torch.uint8).numpy().tobytes())
    child.join(60)
    four = got["four"].share_memory_()
    assert four.is_shared() and four.untyped_storage().nbytes() == 16
    assert_same(four, tensors["four"])


def test_a_file_that_shrank_is_object_changed_never_sigbus(tmp_path: Path) -> None:
    """Issue 26: a lazy load of a file truncated after the constructor raises ObjectChangedError (not ValueError),
    and so does a lazy access after truncation of an already mapped file with ``verify_hash`` (no SIGBUS). Run in
    a child process: a SIGBUS would kill it."""
    import subprocess
    import sys

    tensors = _tensors()
    path = tmp_path / "m.tensors"
    write_file(path, tensors, block_size=4096)
    big = read_index(path).tensors["big"]
    code = f"""
import os
from hf_tensorizer import TensorDeserializer
from hf_tensorizer.errors import ObjectChangedError
path = {str(path)!r}
d = TensorDeserializer(path, lazy=True)
os.truncate(path, 8192)
try:
    d["w"]
except ObjectChangedError as exc:
    print("first:", type(exc).__name__)
d.close()
os.truncate(path, 0)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "first: ObjectChangedError" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    write_file(path, tensors, block_size=4096)
    code = f"""
import os
from hf_tensorizer import TensorDeserializer
from hf_tensorizer.errors import ObjectChangedError
path = {str(path)!r}
d = TensorDeserializer(path, lazy=True, verify_hash=True)
d["w"]  # the file is mapped now
os.truncate(path, {big.offset // 4096 * 4096})
try:
    d["big"]
except ObjectChangedError as exc:
    print("second:", type(exc).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "second: ObjectChangedError" in proc.stdout, (proc.returncode, proc.stderr[-3000:])
