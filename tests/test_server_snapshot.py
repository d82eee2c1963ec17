"""How the predictor guards a local ``model.tensors`` (integrations/server/snapshot.py): the file mapped under a read
lease (default), or a sealed memfd copy mapped by the load (``lease=False``, or no lease to be had); what each
guarantees and when the server reads the file instead.

Everything runs on real files and the real loader (``ModelRunner.load``); no timing is asserted.
"""

from __future__ import annotations

import errno
import gc
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_tensorizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from integrations.server import ModelRunner, ServerConfig  # noqa: E402
from integrations.server.snapshot import SEALS, Snapshot, SnapshotError, reason_not_to, seal_file, seals_of  # noqa: E402
from integrations.tiny import byte_tokenizer, causal_lm  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd_create: Linux only")
MEMFD = "/memfd:hf_tensorizer-snapshot"


def memfd_maps() -> list[str]:
    """This process's mappings of snapshot memfds."""
    with open("/proc/self/maps") as f:
        return [line for line in f if MEMFD in line]


def file_maps(path: Path) -> list[str]:
    """This process's mappings of ``path``."""
    with open("/proc/self/maps") as f:
        return [line for line in f if str(path) in line]


def memfd_fds() -> list[int]:
    """This process's open descriptors of snapshot memfds."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(MEMFD):
                out.append(int(name))
        except OSError:  # the descriptor listdir itself used, closed since
            pass
    return out


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    hf_tensorizer.save_pretrained(causal_lm(hidden=64, layers=2, seed=5), folder, tokenizer=byte_tokenizer())
    return folder


def load(folder: Path, **config: Any) -> ModelRunner:
    runner = ModelRunner(ServerConfig(model_uri=str(folder), **config))
    runner.load()
    return runner


def generate(runner: ModelRunner, prompt: str = "hello snapshot") -> list[int]:
    (pred,) = runner.submit(runner.parse({"instances": [{"prompt": prompt, "max_new_tokens": 8}]})).result()
    return pred["output_ids"]


def assert_unchanged(runner: ModelRunner, before: dict[str, torch.Tensor], ids: list[int]) -> None:
    """The runner's weights are still ``before`` and it still generates ``ids``."""
    after = runner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert generate(runner) == ids


def test_sealed_copy_equals_the_file(tmp_path: Path) -> None:
    src = tmp_path / "blob"
    data = os.urandom(3 << 20) + b"tail"
    src.write_bytes(data)
    fd = seal_file(str(src))
    try:
        assert os.fstat(fd).st_size == len(data)
        assert os.pread(fd, len(data) + 10, 0) == data
        assert seals_of(fd) == set(SEALS)
        with pytest.raises(OSError) as write:
            os.pwrite(fd, b"x", 0)
        assert write.value.errno == errno.EPERM
        for size in (0, len(data) + 1):  # neither shrink nor grow
            with pytest.raises(OSError):
                os.ftruncate(fd, size)
        src.write_bytes(b"changed")  # the source changes: the snapshot does not
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


def test_leased_model_survives_rewrite_and_truncation(artifact: Path) -> None:
    """Default: the load maps model.tensors itself under a read lease. An in-place rewrite and a truncation (from this
    process's own thread: its open() waits while the watcher moves the mapped weights) change nothing, and the
    model then maps the file no more. (The control, a mapping without a lease seeing a rewrite, is in
    test_lease.py: in one process a lease moves every mapping of its file.)"""
    weights = artifact / "model.tensors"
    runner = load(artifact)
    try:
        assert runner.lease_used and not runner.snapshot_used
        assert file_maps(weights), "the file itself is mapped"
        before = {k: v.clone() for k, v in runner.model.state_dict().items()}
        ids = generate(runner)
        with open(weights, "r+b") as f:
            f.write(os.urandom(weights.stat().st_size))
            f.truncate(0)
        assert runner.lease.broken.is_set() and runner.lease.moved_bytes > 0
        assert not file_maps(weights)
        assert_unchanged(runner, before, ids)
    finally:
        runner.shutdown()
        hf_tensorizer.disable()


def test_no_lease_while_another_writer_has_it_open_falls_back_to_the_snapshot(artifact: Path) -> None:
    with open(artifact / "model.tensors", "r+b"):  # a lease is refused while the file is open for writing
        runner = load(artifact)
    try:
        assert runner.snapshot_used and not runner.lease_used and runner.lease is None
    finally:
        runner.shutdown()
        hf_tensorizer.disable()


def test_loaded_model_survives_rewrite_and_truncation(artifact: Path) -> None:
    """With the snapshot, an in-place rewrite and a truncation of model.tensors after the load change nothing.
    Control: the same rewrite under a load that maps the file itself shows the new bytes."""
    weights = artifact / "model.tensors"
    size = weights.stat().st_size
    runner = load(artifact, lease=False)
    mapped = load(artifact, tensorizer_options={"strategy": "auto"})  # the file itself mapped
    try:
        assert runner.snapshot_used and not mapped.snapshot_used
        before = {k: v.clone() for k, v in runner.model.state_dict().items()}
        ids = generate(runner)
        assert generate(mapped) == ids
        with open(weights, "r+b") as f:  # cp new old / rsync --inplace: same inode, new bytes
            f.write(os.urandom(size))
        changed = any(not torch.equal(before[k], v) for k, v in mapped.model.state_dict().items())
        assert changed, "the control load should see the rewrite: the test cannot tell the two apart"
        mapped.shutdown()
        mapped.model = None
        gc.collect()  # before the truncation: a mapping of the file past its new end would SIGBUS
        with open(weights, "r+b") as f:
            f.truncate(0)
        assert_unchanged(runner, before, ids)
    finally:
        runner.shutdown()
        mapped.shutdown()
        hf_tensorizer.disable()


def test_memory_released_after_load(artifact: Path) -> None:
    """The snapshot's own descriptor and shadow folder are gone after the load; the mapping (and the descriptor
    Python's ``mmap`` keeps with it) lives as long as the model (float32: zero copy), or not at all when the load
    casts (float16: pread from the snapshot, which is then freed)."""
    assert not memfd_maps() and not memfd_fds()
    runner = load(artifact, lease=False)
    try:
        assert runner.snapshot_used and runner.snapshot is not None
        assert runner.snapshot.fd is None and runner.snapshot.shadow is None
        assert memfd_maps(), "float32 from a float32 artifact should be views of the snapshot"
        runner.shutdown()
        runner.model = None
        gc.collect()
        assert not memfd_maps() and not memfd_fds()
        cast = load(artifact, precision="float16", lease=False)
        try:
            assert cast.snapshot_used and next(cast.model.parameters()).dtype == torch.float16
            assert not memfd_maps() and not memfd_fds()
        finally:
            cast.shutdown()
    finally:
        runner.shutdown()
        hf_tensorizer.disable()


def test_fallbacks(artifact: Path, tmp_path: Path) -> None:
    """Where the server reads the source itself: pipelines, URIs, CUDA, keys, a chosen strategy, stock loads."""
    ok = {"loader": "hf_tensorizer", "device": "cpu", "key_file": None, "tensorizer_options": {}, "env": {}}
    assert reason_not_to(str(artifact), **ok) is None
    for uri in ("s3://bucket/model", "http://127.0.0.1:1/model", "hf://org/repo", f"file://{artifact}"):
        assert "URI" in (reason_not_to(uri, **ok) or "")
    assert "device" in (reason_not_to(str(artifact), **{**ok, "device": "cuda:0"}) or "")
    assert "key" in (reason_not_to(str(artifact), **{**ok, "key_file": "/k"}) or "")
    assert "key" in (reason_not_to(str(artifact), **{**ok, "env": {"HF_TENSORIZER_KEY": "00" * 32}}) or "")
    assert "strategy" in (reason_not_to(str(artifact), **{**ok, "tensorizer_options": {"strategy": "pread"}}) or "")
    assert "--loader" in (reason_not_to(str(artifact), **{**ok, "loader": "hf"}) or "")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert "pipeline" in (reason_not_to(str(tmp_path / "pipe"), **ok) or "")
    assert "no model.tensors" in (reason_not_to(str(tmp_path), **ok) or "")
    # the loads those reasons lead to read the file, and still give the same model
    reference = load(artifact)
    pread = load(artifact, tensorizer_options={"strategy": "pread"})
    off = load(artifact, snapshot=False)
    try:
        assert reference.lease_used and not pread.lease_used and not off.lease_used
        assert not (reference.snapshot_used or pread.snapshot_used or off.snapshot_used)
        assert generate(pread) == generate(off) == generate(reference)
    finally:
        for r in (reference, pread, off):
            r.shutdown()
        hf_tensorizer.disable()


def test_failed_snapshot_falls_back_to_reading_the_file(artifact: Path) -> None:
    """A snapshot that could not be taken (here: a folder whose weights are not a readable regular file by the
    time the copy starts) is reported once and the load reads the source instead."""
    snap = Snapshot(str(artifact / "missing"))  # nothing there: the copy fails
    snap.start()
    with pytest.raises(SnapshotError):
        snap.wait(timeout=60)
    assert snap.shadow is None and snap.fd is None  # a failed copy leaves nothing behind
    runner = ModelRunner(ServerConfig(model_uri=str(artifact)), snapshot=snap)
    try:
        runner.load()
        assert not runner.snapshot_used and runner.ready.is_set()
    finally:
        runner.shutdown()
        hf_tensorizer.disable()


def test_pipeline_loads_with_dtype_keyword(tmp_path: Path) -> None:
    """Pipelines take the renamed ``dtype=`` (diffusers warns at every load given ``torch_dtype=``) and are
    read without a snapshot."""
    pytest.importorskip("diffusers")
    from integrations.tiny import sd_pipeline

    folder = tmp_path / "tiny-sd"
    hf_tensorizer.save_pretrained(sd_pipeline(), folder)
    runner = ModelRunner(ServerConfig(model_uri=str(folder), precision="float16"))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*torch_dtype.*")
            runner.load()
        assert runner.task == "text-to-image" and not runner.snapshot_used
        assert runner.model.unet.dtype == torch.float16
    finally:
        runner.shutdown()
        hf_tensorizer.disable()
