"""Bad input: every malformed file or misuse raises a specific, typed error with a helpful message."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    BytesSource,
    RecordingSource,
    assert_same_dict,
    entry,
    file_bytes,
    flip_byte,
    patch_preamble,
    preamble_field,
    random_tensor,
    tensor_bytes,
    with_index,
    with_raw_index,
    write_file,
)

from hf_tensorizer import TensorDeserializer, TensorSerializer, read_index
from hf_tensorizer.errors import (
    FormatError,
    HashMismatchError,
    HeaderTooLargeError,
    IndexDigestError,
    SinkError,
    SourceError,
    TensorizerError,
    TruncatedFileError,
    UnknownDtypeError,
    UnsupportedVersionError,
    UsageError,
)
from hf_tensorizer.format import MAGIC, PREAMBLE_SIZE
from hf_tensorizer.sources import FileSink, Sink

pytestmark = [
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
]

TENSORS = {
    "a": random_tensor(torch.float32, (2000,), 1),  # 8000 B: page-aligned
    "b": random_tensor(torch.int16, (3, 5), 2),
    "c": random_tensor(torch.bfloat16, (7,), 3),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return file_bytes(TENSORS, tmp_path_factory.mktemp("bad"), block_size=4096)


def open_bytes(data: bytes, **kwargs: Any) -> TensorDeserializer:
    return TensorDeserializer(BytesSource(data), **kwargs)


def open_file(tmp_path: Path, data: bytes, **kwargs: Any) -> TensorDeserializer:
    (tmp_path / "f.tensors").write_bytes(data)
    return TensorDeserializer(tmp_path / "f.tensors", **kwargs)


def test_good_file_loads(good: bytes) -> None:
    with open_bytes(good, verify_hash=True) as d:
        assert_same_dict(dict(d), TENSORS)


# ---- the preamble --------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(TruncatedFileError, match="0 bytes"):
        open_file(tmp_path, b"")


def test_truncated_at_every_structural_boundary(tmp_path: Path, good: bytes) -> None:
    ilen = preamble_field(good, "index_length")
    doff = preamble_field(good, "data_offset")
    a_off = read_index(BytesSource(good)).tensors["a"].offset
    cuts = [1, 4, 7, 8, 9, 64, PREAMBLE_SIZE - 1, PREAMBLE_SIZE, PREAMBLE_SIZE + 1, PREAMBLE_SIZE + ilen // 2,
            PREAMBLE_SIZE + ilen - 1, PREAMBLE_SIZE + ilen, doff - 1, doff, a_off + 1, a_off + 4000,
            len(good) - 1]  # fmt: skip
    for cut in cuts:
        with pytest.raises(TruncatedFileError) as err:
            open_bytes(good[:cut])
        assert str(err.value), cut
    with pytest.raises(TruncatedFileError, match="truncated"):
        open_file(tmp_path, good[: len(good) - 1])


def test_wrong_magic(good: bytes) -> None:
    for data in (b"X" + good[1:], b"hello world", b"\0" * 4096, b"PK\x03\x04" + good[4:]):
        with pytest.raises(FormatError, match="magic") as err:
            open_bytes(data)
        assert not isinstance(err.value, TruncatedFileError)


def test_upstream_magic_is_told_apart(good: bytes) -> None:
    from hf_tensorizer.format import decode_preamble

    fake = b"|TZR|" + good[5:]
    with pytest.raises(FormatError, match="upstream"):
        decode_preamble(fake)
    with pytest.raises(FormatError):  # the reader hands it to the upstream reader, which refuses garbage
        open_bytes(fake)


@pytest.mark.parametrize("version", [0, 2, 99, 2**32 - 1])
def test_unsupported_version(good: bytes, version: int) -> None:
    with pytest.raises(UnsupportedVersionError, match=f"version {version}"):
        open_bytes(patch_preamble(good, version=version))


def test_bad_preamble_size(good: bytes) -> None:
    with pytest.raises(FormatError, match="preamble size"):
        open_bytes(patch_preamble(good, preamble_size=64))


@pytest.mark.parametrize("bit", [1, 5, 63])
def test_unknown_required_feature_rejected(good: bytes, bit: int) -> None:
    with pytest.raises(UnsupportedVersionError, match="required features"):
        open_bytes(patch_preamble(good, required_features=1 << bit))


@pytest.mark.parametrize("bit", [0, 7, 63])
def test_unknown_optional_feature_ignored(good: bytes, bit: int) -> None:
    with open_bytes(patch_preamble(good, optional_features=1 << bit), verify_hash=True) as d:
        assert_same_dict(dict(d), TENSORS)


def test_encrypted_flag_without_encryption_section(good: bytes) -> None:
    with pytest.raises(FormatError, match="encryption"):
        open_bytes(patch_preamble(good, required_features=1))


@pytest.mark.parametrize("ilen", [1 << 40, 2**64 - 1, (256 << 20) + 1])
def test_oversized_index_length(tmp_path: Path, good: bytes, ilen: int) -> None:
    (tmp_path / "f").write_bytes(patch_preamble(good, index_length=ilen))
    with RecordingSource(tmp_path / "f") as src, pytest.raises(HeaderTooLargeError, match="exceeds the cap"):
        TensorDeserializer(src)
    assert sum(n for _, n in src.ranges) <= 64 << 10  # refused from the preamble: no big read or allocation


def test_index_length_past_data_offset(good: bytes) -> None:
    with pytest.raises(FormatError, match="overlaps the index"):
        open_bytes(patch_preamble(good, index_length=200 << 20))  # under the cap, but not in the file


def test_recorded_sizes_inconsistent(good: bytes) -> None:
    with pytest.raises(FormatError, match="smaller than the data offset"):
        open_bytes(patch_preamble(good, file_size=100))
    with pytest.raises(FormatError, match="trailing data"):
        open_bytes(good + b"\0")


def test_index_digest_mismatch(good: bytes) -> None:
    data = bytearray(good)
    data[PREAMBLE_SIZE + 20] ^= 0x01  # a byte inside the index
    with pytest.raises(IndexDigestError, match="SHA-256"):
        open_bytes(bytes(data))
    data = bytearray(good)
    data[60] ^= 0x80  # a byte of the stored digest itself
    with pytest.raises(IndexDigestError):
        open_bytes(bytes(data))


# ---- the index (valid digest, invalid content) ----------------------------------------------------

GARBAGE: dict[str, bytes] = {
    "not json": b"{not json",
    "not utf8": b'{"a": "\xff\xfe"}',
    "array": b"[]",
    "string": b'"index"',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "huge int literal": b'{"alignment": ' + b"1" * 5000 + b"}",
    "nan": b'{"alignment": NaN, "block_size": 4096, "digest": "crc32", "tensors": []}',
    "empty": b"",
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_index_with_valid_digest(good: bytes, name: str) -> None:
    with pytest.raises(FormatError):
        open_bytes(with_raw_index(good, GARBAGE[name]))


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting ``doc[...]``; path is ``key`` or ``tensor_name.field``."""

    def mutate(doc: dict[str, Any]) -> None:
        if "." in path:
            name, field = path.split(".", 1)
            if value is _DELETE:
                del entry(doc, name)[field]
            else:
                entry(doc, name)[field] = value
        elif value is _DELETE:
            del doc[path]
        else:
            doc[path] = value

    return mutate


_DELETE = object()
I64 = 2**63 - 1

# (mutation, expected error type, a fragment of the message)
BAD_INDEXES: dict[str, tuple[Callable[[dict[str, Any]], Any], type[Exception], str]] = {
    "alignment not power of two": (_set("alignment", 3000), FormatError, "power of two"),
    "alignment negative": (_set("alignment", -4096), FormatError, "unsigned"),
    "alignment missing": (_set("alignment", _DELETE), FormatError, "alignment"),
    "alignment bool": (_set("alignment", True), FormatError, "alignment"),
    "block_size tiny": (_set("block_size", 16), FormatError, "block_size"),
    "unknown digest": (_set("digest", "md5"), FormatError, "digest algorithm"),
    "metadata not map": (_set("metadata", ["x"]), FormatError, "metadata"),
    "metadata not str": (_set("metadata", {"k": 1}), FormatError, "str"),
    "tensors not list": (_set("tensors", {}), FormatError, "tensors"),
    "entry not object": (lambda d: d["tensors"].append(3), FormatError, "entry 3"),
    "no name": (_set("a.name", ""), FormatError, "name"),
    "name not str": (_set("a.name", 7), FormatError, "name"),
    "unknown dtype": (_set("a.dtype", "float128"), UnknownDtypeError, "float128"),
    "dtype not str": (_set("a.dtype", ["float32"]), UnknownDtypeError, "dtype"),
    "shape not list": (_set("a.shape", 2000), FormatError, "shape"),
    "negative dim": (_set("a.shape", [-2000]), FormatError, "dimension"),
    "float dim": (_set("a.shape", [2000.0]), FormatError, "dimension"),
    "too many dims": (_set("c.shape", [1] * 65), FormatError, "dimensions"),
    "dim past int64": (_set("c.shape", [0, 2**64 - 1]), FormatError, "too large"),
    "strides past int64": (_set("c.shape", [0, 2**62, 2**62]), FormatError, "too large"),
    "shape/length mismatch": (_set("a.shape", [1999]), FormatError, "does not match"),
    "length mismatch": (_set("a.length", 8004), FormatError, "does not match"),
    "unknown kind": (_set("a.kind", "weight"), FormatError, "kind"),
    "kind not str": (_set("a.kind", [1]), FormatError, "kind"),
    "offset missing": (_set("a.offset", _DELETE), FormatError, "offset"),
    "offset before data": (_set("a.offset", 64), FormatError, "before the data section"),
    "offset past end": (_set("c.offset", 10**9), FormatError, "past the file end"),
    "offset past u64": (_set("c.offset", 2**64), FormatError, "unsigned 64-bit"),
    "length past end": (lambda d: entry(d, "b").update(shape=[10**6], length=2 * 10**6), FormatError, "past the file"),
    "digest count": (_set("a.digests", ["00000000"]), FormatError, "digests for"),
    "digest malformed": (_set("b.digests", ["XYZ"]), FormatError, "malformed"),
    "digest uppercase": (_set("b.digests", ["ABCDEF01"]), FormatError, "malformed"),
    "digests not list": (_set("b.digests", "00000000"), FormatError, "digests"),
    "crypt on plain file": (_set("b.crypt", {"macs": []}), FormatError, "crypt"),
    "alias not str": (_set("c.alias", 1), FormatError, "alias"),
}


def _overlap(doc: dict[str, Any]) -> None:
    a, b = entry(doc, "a"), entry(doc, "b")
    b["offset"] = a["offset"] + 8


def _duplicate(doc: dict[str, Any]) -> None:
    doc["tensors"].append(dict(entry(doc, "b")))


def _alias_unknown(doc: dict[str, Any]) -> None:
    doc["tensors"].append({"name": "tied", "dtype": "bfloat16", "shape": [7], "kind": "plain", "alias": "nope"})


def _alias_chain(doc: dict[str, Any]) -> None:
    doc["tensors"].append({"name": "t1", "dtype": "bfloat16", "shape": [7], "alias": "c"})
    doc["tensors"].append({"name": "t2", "dtype": "bfloat16", "shape": [7], "alias": "t1"})


def _alias_self(doc: dict[str, Any]) -> None:
    doc["tensors"].append({"name": "me", "dtype": "bfloat16", "shape": [7], "alias": "me"})


def _alias_other_shape(doc: dict[str, Any]) -> None:
    doc["tensors"].append({"name": "t1", "dtype": "bfloat16", "shape": [1, 7], "alias": "c"})


BAD_INDEXES.update(
    {
        "overlapping tensors": (_overlap, FormatError, "overlaps"),
        "duplicate names": (_duplicate, FormatError, "duplicate tensor name 'b'"),
        "alias to unknown": (_alias_unknown, FormatError, "unknown tensor 'nope'"),
        "alias chain": (_alias_chain, FormatError, "another alias"),
        "alias to itself": (_alias_self, FormatError, "another alias"),
        "alias of another shape": (_alias_other_shape, FormatError, "different dtype or shape"),
    }
)


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_invalid_index(good: bytes, case: str) -> None:
    mutate, exc_type, fragment = BAD_INDEXES[case]
    data = with_index(good, mutate)
    with pytest.raises(exc_type) as err:
        open_bytes(data)
    assert isinstance(err.value, FormatError)
    assert fragment in str(err.value), str(err.value)


def test_valid_edits_still_load(good: bytes) -> None:
    """Control: the index surgery itself keeps a file valid when nothing is wrong."""
    data = with_index(good, lambda d: d["metadata"].update(edited="yes"))
    with open_bytes(data, verify_hash=True) as d:
        assert d.metadata == {"edited": "yes"}
        assert_same_dict(dict(d), TENSORS)
    unknown_fields = with_index(good, lambda d: (d.update(future={"x": 1}), entry(d, "a").update(future=2)))
    with open_bytes(unknown_fields) as d:
        assert_same_dict(dict(d), TENSORS)


# ---- data ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [{}, {"mmap": True}, {"strategy": "odirect"}, {"lazy": True}, {"num_readers": 1}])
def test_corruption_names_the_tensor(tmp_path: Path, good: bytes, mode: dict[str, Any]) -> None:
    idx = read_index(BytesSource(good))
    for name in ("a", "c"):
        (tmp_path / "f.tensors").write_bytes(good)
        flip_byte(tmp_path / "f.tensors", idx.tensors[name].offset + idx.tensors[name].length - 1, 0x10)
        with (
            pytest.raises(HashMismatchError) as err,
            TensorDeserializer(tmp_path / "f.tensors", verify_hash=True, **mode) as d,
        ):
            dict(d)
        assert err.value.tensors == [name]
        assert repr(name) in str(err.value) and "digest" in str(err.value)
    # without verification the same file loads (the bytes are simply different)
    with TensorDeserializer(tmp_path / "f.tensors", **mode) as d:
        assert tensor_bytes(d["c"]) != tensor_bytes(TENSORS["c"])


def test_missing_file_and_bad_arguments(tmp_path: Path, good: bytes) -> None:
    with pytest.raises(SourceError, match="cannot open"):
        TensorDeserializer(tmp_path / "nope.tensors")
    with pytest.raises(UsageError, match="strategy"):
        open_bytes(good, strategy="fastest")
    with pytest.raises(UsageError, match="not in the file"):
        open_bytes(good, filter=["a", "zzz"])
    with pytest.raises(UsageError):
        open_bytes(good, strategy="odirect")  # O_DIRECT needs a local file


# ---- the writer ----------------------------------------------------------------------------------


def test_writer_usage_errors(tmp_path: Path) -> None:
    s = TensorSerializer(tmp_path / "w")
    with pytest.raises(UsageError, match="meta"):
        s.write_tensor("m", torch.empty(3, device="meta"))
    with pytest.raises(UsageError, match=r"not a torch\.Tensor"):
        s.write_tensor("n", [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"not a torch\.Tensor"):
        s.write_state_dict({"x": 3})  # type: ignore[dict-item]
    with pytest.raises(UsageError, match="non-empty"):
        s.write_tensor("", torch.zeros(1))
    with pytest.raises(UsageError, match="layout"):
        s.write_tensor("sparse", torch.eye(3).to_sparse())
    with pytest.raises(UnknownDtypeError):
        s.write_tensor("q", torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8))
    s.write_tensor("ok", torch.zeros(2))
    with pytest.raises(UsageError, match="already written"):
        s.write_tensor("ok", torch.ones(2))
    s.close()
    with pytest.raises(UsageError, match="closed"):
        s.write_tensor("late", torch.zeros(1))
    with pytest.raises(UsageError, match="metadata"):
        TensorSerializer(tmp_path / "w2", metadata={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="digest"):
        TensorSerializer(tmp_path / "w3", digest="md5")
    assert_same_dict(TensorDeserializer(tmp_path / "w"), {"ok": torch.zeros(2)})


class FullDiskSink(FileSink):
    """A real local file sink whose disk fills up after ``limit`` bytes."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(path)
        self.limit = limit
        self.written = 0

    def write(self, data: memoryview | bytes) -> None:
        if self.written + len(data) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(data)
        self.written += len(data)


class BrokenPipeSink(Sink):
    """A non-seekable sink (like a pipe) that breaks after a few writes."""

    def __init__(self) -> None:
        self.uri = "pipe://test"
        self.writes = 0
        self.committed = self.aborted = False

    def write(self, data: memoryview | bytes) -> None:
        self.writes += 1
        if self.writes == 3:
            raise RuntimeError("reader went away")

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        self.aborted = True


BIG = {f"t{i}": random_tensor(torch.float32, (5000,), i) for i in range(4)}


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_disk_full(tmp_path: Path) -> None:
    dest = tmp_path / "model.tensors"
    s = TensorSerializer(FullDiskSink(dest, limit=30_000))
    s.write_state_dict(BIG)
    with pytest.raises(SinkError, match="No space left"):
        s.close()
    assert not dest.exists() and _no_temp_files(tmp_path)


def test_atomic_write_keeps_previous_file(tmp_path: Path) -> None:
    dest = tmp_path / "model.tensors"
    write_file(dest, {"old": torch.ones(3)})
    before = dest.read_bytes()
    s = TensorSerializer(FullDiskSink(dest, limit=10_000))
    s.write_state_dict(BIG)
    with pytest.raises(SinkError):
        s.close()
    assert dest.read_bytes() == before and _no_temp_files(tmp_path)


def test_atomic_write_non_seekable_sink_aborts() -> None:
    sink = BrokenPipeSink()
    s = TensorSerializer(sink)
    s.write_state_dict(BIG)
    with pytest.raises(RuntimeError, match="went away"):
        s.close()
    assert sink.aborted and not sink.committed


def test_unwritable_destination(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SinkError, match="cannot create"):
        write_file(tmp_path / "a_file" / "model.tensors", BIG)
    (tmp_path / "a_dir.tensors").mkdir()  # the destination name is taken by a directory: commit fails
    with pytest.raises(SinkError, match="cannot commit"):
        write_file(tmp_path / "a_dir.tensors", BIG)
    assert _no_temp_files(tmp_path)
    if os.geteuid() != 0:  # root ignores directory permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(SinkError):
                write_file(ro / "model.tensors", BIG)
        finally:
            ro.chmod(0o700)


def test_exception_inside_context_manager_writes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "ctx.tensors"
    with pytest.raises(KeyError), TensorSerializer(dest) as s:
        s.write_state_dict(BIG)
        raise KeyError("user code failed")
    assert not dest.exists() and _no_temp_files(tmp_path)


def test_every_error_is_a_tensorizer_error() -> None:
    for exc in (FormatError, HashMismatchError, HeaderTooLargeError, IndexDigestError, SinkError, SourceError,
                TruncatedFileError, UnknownDtypeError, UnsupportedVersionError, UsageError):  # fmt: skip
        assert issubclass(exc, TensorizerError)
    assert MAGIC.startswith(b"HFTZ")


@pytest.mark.parametrize("kwargs", [{"alignment": 3000}, {"alignment": 32}, {"block_size": 1000}])
def test_writer_rejects_bad_layout_options_early(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        TensorSerializer(tmp_path / "x", **kwargs)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_readers": -1}, "num_readers"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"staging_bytes": -5}, "staging_bytes"),
        ({"staging_allocation": "bogus"}, "staging_allocation"),
        ({"dtype": torch.int8}, "floating"),
        ({"strategy": "fast"}, "strategy"),
        ({"verify_hashes": True}, "unknown options"),  # a typo must not silently drop the check
        ({"filter": ["nope"]}, "not in the file"),
        ({"mmap": True, "transform": lambda p, v: None}, "mmap"),
    ],
)
def test_bad_arguments_are_usage_errors_and_leak_nothing(tmp_path: Path, kwargs: dict, match: str) -> None:
    write_file(tmp_path / "m", {"a": torch.randn(100), "b": torch.arange(5)})
    TensorDeserializer(tmp_path / "m").close()  # warm up lazy imports, so the fd count is stable
    before = _open_fds()
    with pytest.raises(UsageError, match=match):
        TensorDeserializer(tmp_path / "m", **kwargs)
    assert _open_fds() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_usage_error(tmp_path: Path) -> None:
    write_file(tmp_path / "m", {"a": torch.randn(10)})
    with pytest.raises(UsageError, match="no CUDA"):
        TensorDeserializer(tmp_path / "m", device="cuda")


def test_failed_load_and_dropped_deserializers_close_their_files(tmp_path: Path) -> None:
    import gc

    idx = write_file(tmp_path / "m", {"a": torch.randn(5000), "b": torch.randn(10)})
    flip_byte(tmp_path / "m", idx.tensors["a"].offset + 3)
    TensorDeserializer(tmp_path / "m").close()
    gc.collect()  # garbage of earlier tests in this worker (sockets, files) must not close during the count
    before = _open_fds()
    for strategy in ("pread", "odirect"):
        with pytest.raises(HashMismatchError):
            TensorDeserializer(tmp_path / "m", verify_hash=True, strategy=strategy)
    for _ in range(5):
        d = TensorDeserializer(tmp_path / "m", lazy=True)
        del d
    gc.collect()
    assert _open_fds() == before


def test_lazy_access_after_close_says_closed(tmp_path: Path) -> None:
    write_file(tmp_path / "m", {"a": torch.randn(10)})
    d = TensorDeserializer(tmp_path / "m", lazy=True)
    d.close()
    with pytest.raises(UsageError, match="closed"):
        d["a"]


def test_read_index_takes_a_path(tmp_path: Path) -> None:
    write_file(tmp_path / "m", {"a": torch.randn(10)})
    assert list(read_index(str(tmp_path / "m")).tensors) == ["a"]


def test_index_argument_must_come_from_the_same_open_source(tmp_path: Path) -> None:
    from hf_tensorizer.sources import open_source

    sd = {"a": torch.randn(10), "b": torch.arange(5)}
    write_file(tmp_path / "m", sd)
    write_file(tmp_path / "other", {"c": torch.randn(1000)})
    with pytest.raises(UsageError, match="same open Source"):  # a path: the deserializer opens its own source
        TensorDeserializer(tmp_path / "m", index=read_index(str(tmp_path / "m")))
    with open_source(str(tmp_path / "m")) as src:
        with pytest.raises(UsageError, match="same open Source"):
            TensorDeserializer(src, index=read_index(str(tmp_path / "other")))
        index = read_index(src)
        for names in (["a"], ["b"]):  # two filtered loads share one header read
            with TensorDeserializer(src, filter=names, index=index) as d:
                assert list(d) == names and all(torch.equal(d[n], sd[n]) for n in names)
