"""Progress bars (hf_tensorizer/engine/progress.py): shown for a load or save that runs past the delay, where someone
watches or when asked (``HF_TENSORIZER_PROGRESS=1``); never for short operations nor when the Hub's bars are off.

The delay is shortened here (``progress.DELAY``) and loads are slowed by a source that sleeps, so every test takes
well under a second of waiting.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
import torch
from helpers import BytesSource, file_bytes

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.engine import progress

TENSORS = {f"w{i}": torch.full((64, 1024), float(i)) for i in range(4)}  # 1 MiB of float32
TOTAL = sum(t.numel() * t.element_size() for t in TENSORS.values())


class SlowSource(BytesSource):
    """An in-memory remote file whose every read takes a while: a load that runs past the (shortened) delay."""

    pause = 0.05

    def read_into(self, offset: int, buf: memoryview) -> None:
        if len(buf) > 4096:  # the index reads stay fast
            time.sleep(self.pause)
        super().read_into(offset, buf)


@pytest.fixture
def short_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.1)
    monkeypatch.setattr(progress, "REFRESH", 0.02)
    for name in ("HF_TENSORIZER_PROGRESS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def hub_bars_on(monkeypatch: pytest.MonkeyPatch) -> object:
    """huggingface_hub's bars on, as in a session without HF_HUB_DISABLE_PROGRESS_BARS (conftest sets it, and
    huggingface_hub reads it once, at import)."""
    import importlib

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", None)
    was_disabled = are_progress_bars_disabled()
    enable_progress_bars()
    yield
    if was_disabled:
        disable_progress_bars()


def _slow_load(tmp_path: Path, chunk_bytes: int = 64 << 10) -> dict[str, torch.Tensor]:
    source = SlowSource(file_bytes(TENSORS, tmp_path), uri="memory://slow")
    with TensorDeserializer(source, chunk_bytes=chunk_bytes, num_readers=2) as d:
        return dict(d)


def _bars(text: str, label: str) -> list[str]:
    """The last state of every ``label`` bar tqdm drew into ``text``."""
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.strip().startswith(label)]


def test_slow_load_shows_bytes_and_rate_when_asked(short_delay, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TENSORIZER_PROGRESS", "1")
    loaded = _slow_load(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())
    bars = _bars(capsys.readouterr().err, "loading")
    assert bars, "no progress bar for a load past the delay"
    assert re.search(r"100%.*1\.05M/1\.05M.*B/s", bars[-1]), bars[-1]  # bytes done / total, and the rate
    assert any(re.search(r"\d+%", b) and not b.startswith("loading: 100%") for b in bars), "never drawn mid-way"


def test_short_load_draws_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TENSORIZER_PROGRESS", "1")  # the default delay: a 1 MiB load is over long before
    path = tmp_path / "m.tensors"
    path.write_bytes(file_bytes(TENSORS, tmp_path))
    with TensorDeserializer(str(path)) as d:
        dict(d)
    assert not _bars(capsys.readouterr().err, "loading")


@pytest.mark.parametrize("switch", ["env", "function", "ours-off"])
def test_switches_turn_it_off(switch, short_delay, hub_bars_on, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stderr", _Terminal())  # where someone watches: shown unless switched off
    if switch == "env":
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    elif switch == "function":
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        monkeypatch.setenv("HF_TENSORIZER_PROGRESS", "0")
    _slow_load(tmp_path)
    assert not _bars(progress.sys.stderr.getvalue(), "loading")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_shows_it_logs_do_not(short_delay, hub_bars_on, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log file: nothing unless asked
    _slow_load(tmp_path)
    assert not _bars(progress.sys.stderr.getvalue(), "loading")
    monkeypatch.setattr("sys.stderr", _Terminal())
    _slow_load(tmp_path)
    assert _bars(progress.sys.stderr.getvalue(), "loading")


def test_enabled_rules(monkeypatch, hub_bars_on) -> None:
    monkeypatch.delenv("HF_TENSORIZER_PROGRESS", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not progress.enabled()
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert progress.enabled()
    monkeypatch.setenv("HF_TENSORIZER_PROGRESS", "0")
    assert not progress.enabled()
    monkeypatch.setenv("HF_TENSORIZER_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    assert progress.enabled()  # asked for explicitly: ours wins over the Hub's global switch


def test_local_file_counts_through_the_kernel(short_delay, tmp_path, monkeypatch) -> None:
    """A local file is not wrapped (no cost on the fast path); its bytes come from /proc/self/io."""
    path = tmp_path / "m.tensors"
    path.write_bytes(file_bytes(TENSORS, tmp_path))
    with TensorDeserializer(str(path), lazy=True, strategy="pread") as d:
        assert not isinstance(d._source, progress.CountingSource)
        seen: list[int] = []
        real = progress.Progress.__init__

        def spy(self, desc, total, done=None, show=None) -> None:
            real(self, desc, total, done, show)
            seen.append(total)

        monkeypatch.setattr(progress.Progress, "__init__", spy)
        before = progress._rchar()
        d["w0"]
        if before is not None:
            assert progress._rchar() - before >= TENSORS["w0"].numel() * 4
    assert seen == [TENSORS["w0"].numel() * 4]


def test_slow_save_shows_a_bar(short_delay, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TENSORIZER_PROGRESS", "1")

    from hf_tensorizer.sources import Sink

    class SlowSink(Sink):
        uri = "memory://slow-sink"

        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, data: memoryview | bytes) -> None:
            time.sleep(0.02)
            self.data += data

        def commit(self) -> None:
            pass

        def abort(self) -> None:
            pass

    sink = SlowSink()
    with TensorSerializer(sink, block_size=64 << 10) as s:
        s.write_state_dict(TENSORS)
    assert _bars(capsys.readouterr().err, "serializing")
    with TensorDeserializer(BytesSource(bytes(sink.data))) as d:
        assert all(torch.equal(d[k], v) for k, v in TENSORS.items())


def test_save_progress_false_never_draws(short_delay, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TENSORIZER_PROGRESS", "1")
    path = tmp_path / "m.tensors"
    with TensorSerializer(str(path), progress=False) as s:
        s.write_state_dict(TENSORS)
    time.sleep(0.2)
    assert not _bars(capsys.readouterr().err, "serializing")


def test_failed_load_or_save_stops_its_bar(short_delay, tmp_path) -> None:
    from hf_tensorizer.errors import SinkError, TruncatedFileError
    from hf_tensorizer.sources import Sink

    class BrokenSink(Sink):
        uri = "memory://broken"
        writes = 0

        def write(self, data: memoryview | bytes) -> None:
            self.writes += 1
            if self.writes > 3:  # the header and a few blocks went out
                raise SinkError("the disk is full")

        def commit(self) -> None:
            pass

        def abort(self) -> None:
            pass

    with pytest.raises(SinkError), TensorSerializer(BrokenSink(), progress=True, block_size=64 << 10) as s:
        s.write_state_dict(TENSORS)
    data = file_bytes(TENSORS, tmp_path)
    with pytest.raises(TruncatedFileError):  # the index promises more bytes than the source has
        TensorDeserializer(_Short(data[: len(data) - 1000]), num_readers=1)
    assert progress._active == []  # nothing left for the drawing thread


class _Short(BytesSource):
    """A remote file cut short after its size was read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.size = len(data) + 1000

    def read_into(self, offset: int, buf: memoryview) -> None:
        from hf_tensorizer.errors import TruncatedFileError

        if offset + len(buf) > len(self._data):
            raise TruncatedFileError(f"{self.uri} ends at {len(self._data)}")
        buf[:] = self._data[offset : offset + len(buf)]
