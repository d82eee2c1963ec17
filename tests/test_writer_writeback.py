"""A local save starts the disk writing while it goes (``sync_file_range`` every ``WRITEBACK_BYTES``), so the final
fsync waits only for the tail; the bytes, the fsync before the rename and the loaded tensors stay exactly as they
were without it."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from helpers import assert_same_dict

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.sources import file as file_mod


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    sd = {f"w{i}": torch.randn(700_000 + 4099 * i, generator=g).to(torch.bfloat16) for i in range(8)}
    sd["small"] = torch.arange(7, dtype=torch.int16)
    return sd


def test_writeback_is_started_in_order_during_the_save_and_the_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = _state_dict()
    events: list[tuple] = []
    real_start, real_fsync, real_replace = file_mod._start_writeback, os.fsync, os.replace

    def start(fd: int, offset: int, nbytes: int, *, wait_before: bool = False) -> bool:
        ok = real_start(fd, offset, nbytes, wait_before=wait_before)
        events.append(("wb", offset, nbytes, wait_before, ok))
        return ok

    monkeypatch.setattr(file_mod, "WRITEBACK_BYTES", 1 << 20)
    monkeypatch.setattr(file_mod, "_start_writeback", start)
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync",)) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace",)) or real_replace(a, b))
    with TensorSerializer(tmp_path / "wb.tensors", block_size=256 << 10) as s:
        s.write_state_dict(sd)
    monkeypatch.undo()
    size = (tmp_path / "wb.tensors").stat().st_size
    started = [e for e in events if e[0] == "wb" and not e[3]]
    assert len(started) >= size // (1 << 20) - 1  # one per window
    assert all(e[4] for e in events if e[0] == "wb")  # the real syscall succeeded (Linux)
    assert started[0][1] == 0 and all(a[1] + a[2] == b[1] for a, b in itertools.pairwise(started))  # contiguous
    assert all(e[2] >= 1 << 20 for e in started)
    waited = [e for e in events if e[0] == "wb" and e[3]]
    assert [(e[1], e[2]) for e in waited] == [(e[1], e[2]) for e in started[:-1]]  # each window, before the next
    assert [e[0] for e in events if e[0] != "wb"][-2:] == ["fsync", "replace"]  # durability kept: fsync, rename
    assert events.index(started[-1]) < events.index(("fsync",))  # writing began before the commit
    with monkeypatch.context() as m:  # the same save without writeback: the same bytes
        m.setattr(file_mod, "WRITEBACK_BYTES", 1 << 62)
        with TensorSerializer(tmp_path / "plain.tensors", block_size=256 << 10) as s:
            s.write_state_dict(sd)
    assert (tmp_path / "wb.tensors").read_bytes() == (tmp_path / "plain.tensors").read_bytes()
    with TensorDeserializer(tmp_path / "wb.tensors", verify_hash=True) as d:
        assert_same_dict(dict(d), sd)


def test_start_writeback_is_a_real_syscall_on_linux(tmp_path: Path) -> None:
    if os.uname().sysname != "Linux":
        pytest.skip("sync_file_range is Linux only")
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        assert file_mod._start_writeback(f.fileno(), 0, 1 << 20)
        assert file_mod._start_writeback(f.fileno(), 0, 1 << 20, wait_before=True)
    assert not file_mod._start_writeback(-1, 0, 4096)  # EBADF: reported, not raised (the fsync still does all)
