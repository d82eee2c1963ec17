"""Local paths and caller file objects that misbehave: a FIFO, a directory, a file object that raises or returns
``str``. Each is a typed error (``SourceError`` / ``SinkError``), never a hang or an untyped exception."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import write_file

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.errors import SinkError, SourceError
from hf_tensorizer.sources.file import FileSource


def _bounded(fn: Any, seconds: float = 10) -> BaseException | None:
    """Run ``fn`` on a thread; its exception, or a failure when it is still running after ``seconds``."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        return TimeoutError(f"still blocked after {seconds} s")
    return out[0]


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "model.tensors"
    os.mkfifo(fifo)
    try:
        err = _bounded(lambda: TensorDeserializer(fifo))
        assert isinstance(err, SourceError) and "FIFO" in str(err), repr(err)
    finally:  # unblock an open still waiting for a writer (the old behaviour), so the thread can end
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK) if _has_reader(fifo) else None
        if fd is not None:
            os.close(fd)


def _has_reader(fifo: Path) -> bool:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        return True
    except OSError:  # ENXIO: nobody has it open for reading
        return False


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="directory"):
        FileSource(tmp_path)


def test_a_regular_file_still_reads_blocking(tmp_path: Path) -> None:
    path = tmp_path / "m.tensors"
    write_file(path, {"a": torch.arange(10)})
    src = FileSource(path)
    try:
        import fcntl

        assert not fcntl.fcntl(src.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert src.size == path.stat().st_size
    finally:
        src.close()
    with TensorDeserializer(path) as d:
        assert torch.equal(d["a"], torch.arange(10))


class _Raises(io.RawIOBase):
    """A binary file object over ``data`` whose reads raise ``exc`` from the ``after``-th call on."""

    def __init__(self, data: bytes, exc: BaseException, after: int = 0, seekable: bool = True) -> None:
        self._f, self.exc, self.after, self._seekable = io.BytesIO(data), exc, after, seekable

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b: Any) -> int:
        if self.after <= 0:
            raise self.exc
        self.after -= 1
        return self._f.readinto(b)


class _ReturnsStr:
    """Looks binary (no TextIOBase), but ``read`` returns ``str``; no ``readinto``."""

    def __init__(self, data: bytes, seekable: bool) -> None:
        self._f, self._seekable = io.BytesIO(data), seekable

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> str:
        return self._f.read(n).decode("latin-1")


@pytest.fixture
def data(tmp_path: Path) -> bytes:
    path = tmp_path / "m.tensors"
    write_file(path, {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(7)})
    return path.read_bytes()


@pytest.mark.parametrize("seekable", [True, False])
@pytest.mark.parametrize("after", [0, 1, 3])
def test_a_file_object_that_raises_is_a_source_error(data: bytes, seekable: bool, after: int) -> None:
    class Odd(Exception):
        pass

    if not seekable and after > 1:
        pytest.skip("a stream is spooled in two reads (the data, then the end)")

    f = _Raises(data, Odd("the caller's own failure"), after=after, seekable=seekable)
    with pytest.raises(SourceError, match="Odd: the caller's own failure"):
        TensorDeserializer(f, strategy="pread")


@pytest.mark.parametrize("seekable", [True, False])
def test_a_file_object_that_returns_str_is_a_source_error(data: bytes, seekable: bool) -> None:
    with pytest.raises(SourceError, match="returned str"):
        TensorDeserializer(_ReturnsStr(data, seekable), strategy="pread")


def test_a_file_object_whose_readinto_returns_nonsense_is_a_source_error(data: bytes) -> None:
    class Liar(_Raises):
        def readinto(self, b: Any) -> Any:
            return "12"

    with pytest.raises(SourceError, match="readinto"):
        TensorDeserializer(Liar(data, RuntimeError()), strategy="pread")


def test_a_sink_file_object_that_raises_is_a_sink_error() -> None:
    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            raise RuntimeError("quota exceeded")

    with pytest.raises(SinkError, match="RuntimeError: quota exceeded"), TensorSerializer(Full()) as s:
        s.write_state_dict({"a": torch.ones(3)})
