"""Local saves write with O_DIRECT through a few page-aligned buffers (``sources/file.py``): the files are
byte-for-byte those of a buffered save at every size (tails that are no multiple of 4096 included), a file system
that refuses O_DIRECT gets the buffered path, ``HF_TENSORIZER_DIRECT_WRITE=0`` and ``direct=False`` opt out, the
fsync-then-rename commit is kept, and the save's memory beyond the tensors is the staging buffers plus a constant."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.engine.pagecache import resident_fraction
from hf_tensorizer.sources import file as file_mod
from hf_tensorizer.sources.file import DIRECT_BUFFER_BYTES, DIRECT_BUFFERS, FileSink

REPO = Path(__file__).resolve().parent.parent


def _direct_supported(directory: Path) -> bool:
    """Whether this file system takes an aligned O_DIRECT write (CI's temporary directories may not)."""
    import mmap

    probe = directory / ".direct-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        if not file_mod._set_direct(fd, True):
            return False
        buf = mmap.mmap(-1, 4096)
        try:
            os.pwrite(fd, buf, 0)
        except OSError:
            return False
        finally:
            buf.close()
        return True
    finally:
        os.close(fd)
        probe.unlink()


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    sd = {f"w{i}": torch.randn(900_000 + 4099 * i, generator=g).to(torch.bfloat16) for i in range(9)}
    sd["odd"] = torch.arange(7, dtype=torch.int16)  # the file ends on a size that is no multiple of 4096
    return sd


def test_direct_save_matches_a_buffered_one_and_leaves_no_page_cache(tmp_path: Path) -> None:
    sd = _state_dict()
    sink = FileSink(tmp_path / "direct.tensors")
    if _direct_supported(tmp_path):
        assert sink.direct
    with TensorSerializer(sink, block_size=1 << 20) as s:
        s.write_state_dict(sd)
    with TensorSerializer(FileSink(tmp_path / "buffered.tensors", direct=False), block_size=1 << 20) as s:
        s.write_state_dict(sd)
    direct, buffered = (tmp_path / "direct.tensors").read_bytes(), (tmp_path / "buffered.tensors").read_bytes()
    assert len(direct) > DIRECT_BUFFERS * DIRECT_BUFFER_BYTES and len(direct) % 4096  # every buffer reused, a tail
    assert direct == buffered
    assert not list(tmp_path.glob("*.tmp"))
    with TensorDeserializer(tmp_path / "direct.tensors", verify_hash=True) as d:
        assert_same_dict(dict(d), sd)
    if sink.direct:  # O_DIRECT bypassed the page cache: the data pages were never cached (the head was)
        path = tmp_path / "again.tensors"
        with TensorSerializer(path, block_size=1 << 20) as s:
            s.write_state_dict(sd)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            cached = resident_fraction(fd, size, samples=size // (64 << 10))
        finally:
            os.close(fd)
        assert cached is not None and cached < 0.1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunks=st.lists(st.integers(0, 3 * DIRECT_BUFFER_BYTES // 2), min_size=0, max_size=8),
    head=st.integers(0, 9000),
    direct=st.booleans(),
)
def test_any_sequence_of_writes_gives_exactly_those_bytes(tmp_path: Path, chunks: list[int], head: int,
                                                          direct: bool) -> None:  # fmt: skip
    total = sum(chunks)
    data = bytes((i * 131 + total) % 251 for i in range(min(total, 1 << 16))) * (total // (1 << 16) + 1)
    data = data[:total]
    dest = tmp_path / f"f-{total}-{head}-{direct}"
    sink = FileSink(dest, direct=direct)
    sink.expect_size(total)
    pos = 0
    for n in chunks:
        sink.write(memoryview(data)[pos : pos + n])
        pos += n
    head = min(head, total)
    new_head = bytes(range(256)) * (head // 256 + 1)
    sink.rewrite_head(new_head[:head])
    sink.commit()
    assert dest.read_bytes() == new_head[:head] + data[head:]
    assert dest.stat().st_size == total  # padding of the tail and preallocated space both cut
    dest.unlink()


def test_a_file_system_refusing_direct_writes_gets_buffered_ones(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Some file systems accept the O_DIRECT flag but fail the writes with EINVAL: the save goes on buffered."""
    if not _direct_supported(tmp_path):
        pytest.skip("this file system takes no O_DIRECT at all (the flag itself is refused: the buffered path)")
    real = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    sd = _state_dict()
    sink = FileSink(tmp_path / "fallback.tensors")
    assert sink.direct
    with TensorSerializer(sink, block_size=1 << 20) as s:
        s.write_state_dict(sd)
    monkeypatch.undo()
    assert refused == [0] and not sink.direct  # refused once, then everything buffered
    with TensorSerializer(FileSink(tmp_path / "buffered.tensors", direct=False), block_size=1 << 20) as s:
        s.write_state_dict(sd)
    assert (tmp_path / "fallback.tensors").read_bytes() == (tmp_path / "buffered.tensors").read_bytes()


def test_tmpfs_saves_whatever_its_kernel_allows(tmp_path: Path) -> None:
    """tmpfs refuses O_DIRECT before Linux 6.6 and takes it after: the file is right either way."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    sd = _state_dict()
    dest = Path("/dev/shm") / f"hft-direct-{os.getpid()}.tensors"
    try:
        with TensorSerializer(dest, block_size=1 << 20) as s:
            s.write_state_dict(sd)
        with TensorDeserializer(dest, verify_hash=True) as d:
            assert_same_dict(dict(d), sd)
    finally:
        dest.unlink(missing_ok=True)


def test_a_write_error_aborts_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_tensorizer.errors import SinkError

    real = os.pwrite

    def pwrite(fd: int, data: object, offset: int) -> int:
        if offset >= 2 * DIRECT_BUFFER_BYTES:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(SinkError, match="No space left"), TensorSerializer(tmp_path / "full.tensors") as s:
        s.write_state_dict(_state_dict())
    assert list(tmp_path.iterdir()) == []


_CHILD = r"""
import json, os, sys
import torch
from hf_tensorizer import TensorSerializer
from hf_tensorizer.sources.file import FileSink
print(json.dumps({"default_direct": FileSink(sys.argv[1] + "/probe").direct}))
"""


@pytest.mark.parametrize("value", ["0", "1"])
def test_the_environment_turns_direct_writes_off(tmp_path: Path, value: str) -> None:
    env = dict(os.environ, HF_TENSORIZER_DIRECT_WRITE=value, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    direct = json.loads(out.stdout.strip().splitlines()[-1])["default_direct"]
    assert direct is (value == "1" and _direct_supported(tmp_path) and not _memory_backed(tmp_path))


def _memory_backed(directory: Path) -> bool:
    fd = os.open(directory, os.O_RDONLY)
    try:
        return file_mod._memory_backed(fd)
    finally:
        os.close(fd)


def test_memory_file_systems_take_the_tensors_bytes_directly(tmp_path: Path) -> None:
    """On tmpfs the default is no staging and no preallocation (both would only cost: the file is memory);
    ``direct=True`` still stages, and either way the file is the buffered save's, byte for byte."""
    if not os.path.isdir("/dev/shm") or not _memory_backed(Path("/dev/shm")):
        pytest.skip("no tmpfs at /dev/shm")
    import tempfile

    sd = _state_dict()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        sink = FileSink(Path(shm) / "default.tensors")
        assert sink.direct is False
        sink.expect_size(64 << 20)
        (tmp,) = Path(shm).iterdir()
        assert tmp.stat().st_blocks == 0  # nothing reserved: fallocate on tmpfs would zero 64 MiB of memory
        sink.abort()
        assert list(Path(shm).iterdir()) == []
        for name, direct in (("default", None), ("staged", True)):
            with TensorSerializer(FileSink(Path(shm) / f"{name}.tensors", direct=direct), block_size=1 << 20) as s:
                s.write_state_dict(sd)
        with TensorSerializer(FileSink(tmp_path / "buffered.tensors", direct=False), block_size=1 << 20) as s:
            s.write_state_dict(sd)
        expected = (tmp_path / "buffered.tensors").read_bytes()
        assert (Path(shm) / "default.tensors").read_bytes() == expected
        assert (Path(shm) / "staged.tensors").read_bytes() == expected


_MOUNT_LINE = "36 35 {dev} / {point} rw,relatime shared:1 - {fs} {source} rw"


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_mountinfo_parser_takes_any_text(text: str) -> None:
    found = file_mod.mount_fs_type(text, 0, 21)
    assert found is None or (isinstance(found, str) and found and " " not in found)


_WORD = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(before=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300), _WORD), max_size=5), fs=_WORD,
       point=_WORD, source=_WORD, major=st.integers(0, 300), minor=st.integers(0, 300))  # fmt: skip
def test_mountinfo_parser_finds_the_device_line(before: list[tuple[int, int, str]], fs: str, point: str, source: str,
                                                major: int, minor: int) -> None:  # fmt: skip
    others = [(a, b, f) for a, b, f in before if (a, b) != (major, minor)]
    lines = [_MOUNT_LINE.format(dev=f"{a}:{b}", point=f"/m{i}", fs=f, source="x") for i, (a, b, f) in enumerate(others)]
    lines.append(_MOUNT_LINE.format(dev=f"{major}:{minor}", point="/" + point, fs=fs, source=source))
    assert file_mod.mount_fs_type("\n".join(lines) + "\n", major, minor) == fs
    assert file_mod.mount_fs_type("\n".join(lines[:-1]), major, minor) is None


_PEAK = r"""
import json, sys
import torch
from hf_tensorizer import TensorSerializer

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

sd = {f"w{i}": torch.full((16 << 20,), i, dtype=torch.uint8) for i in range(16)}  # 256 MiB, every page touched
with TensorSerializer(sys.argv[1] + "/warm.tensors") as s:  # threads, imports and buffers once, outside the count
    s.write_state_dict({"w": sd["w0"]})
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kib("VmRSS")
with TensorSerializer(sys.argv[1] + "/big.tensors") as s:
    s.write_state_dict(sd)
print(json.dumps({"above_kib": kib("VmHWM") - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_of_a_plain_save_is_the_staging_buffers_plus_a_constant(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    above = json.loads(out.stdout.strip().splitlines()[-1])["above_kib"] << 10
    # the tensors are written from where they are (256 MiB): what the save adds is its staging buffers (or, where
    # the file system takes no O_DIRECT, nothing) and thread stacks, index and bookkeeping
    assert above <= DIRECT_BUFFERS * DIRECT_BUFFER_BYTES + (24 << 20), f"peak grew by {above >> 20} MiB"
