"""Read leases on mapped files (hf_tensorizer/engine/lease.py): a writer waits while the mapped tensors move into
private memory at the same addresses; refusals are typed; a move that fails ends the process before the writer can
write. Real files, real leases, real writer processes; each scenario runs in a fresh interpreter, so a lease or a
failure cannot reach the test process. No timing is asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.engine.lease import FileLease, supported
from hf_tensorizer.errors import LeaseUnavailableError, SourceError

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not supported(), reason="file leases: Linux only")

# A child process: writes a file of 8 float32 tensors (fixed seed), maps it under a lease, then runs BODY.
PRELUDE = """
import json, os, subprocess, sys, time, logging
import torch
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.engine.lease import FileLease
path = sys.argv[1]
g = torch.Generator().manual_seed(3)
ref = {f"w{i}": torch.randn(256, 1024, generator=g) for i in range(8)}
s = TensorSerializer(path); s.write_state_dict(ref); s.close()
size = os.path.getsize(path)
def maps(name):
    with open("/proc/self/maps") as f:
        return sum(name in line for line in f)
WRITER = ("import os, sys; f = open(sys.argv[1], 'r+b'); f.write(b'\\\\xff' * os.path.getsize(sys.argv[1])); "
          "f.truncate(4096); f.close()")
"""


def child(tmp_path: Path, body: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    code = PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.tensors")], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def results(proc: subprocess.CompletedProcess[str]) -> dict:
    import json

    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_writer_waits_while_mapped_tensors_move(tmp_path: Path) -> None:
    """A rewrite and truncation from another process after a mapped load: the writer's open() returns only after
    the tensors moved; they keep their addresses and bytes, reading every page after the truncation is safe, the
    process maps the file no more, and a tensor stays writable (copy-on-write, as before)."""
    out = results(
        child(
            tmp_path,
            """
        lease = FileLease.take(path)
        d = TensorDeserializer(path, device="cpu", strategy="mmap")
        got = dict(d)
        ptrs = {k: t.data_ptr() for k, t in got.items()}
        before = maps(os.path.basename(path))
        subprocess.run([sys.executable, "-c", WRITER, path], check=True)  # blocks in open() until the move is done
        touched = sum(float(t.sum()) for t in got.values())  # every page, past the file's new end too
        got["w0"][0, 0] += 1
        print(json.dumps({
            "strategy": d.metrics.strategy, "maps_before": before, "maps_after": maps(os.path.basename(path)),
            "moved_maps": maps("hf_tensorizer-moved"), "broken": lease.broken.is_set(), "moved": lease.moved_bytes,
            "size_after": os.path.getsize(path), "same_ptrs": all(got[k].data_ptr() == p for k, p in ptrs.items()),
            "equal": all(torch.equal(got[k], ref[k]) for k in ref if k != "w0"),
            "w0": float(got["w0"][0, 0] - ref["w0"][0, 0]), "touched": touched == touched,
        }))
    """,
        )
    )
    assert out["strategy"] == "mmap" and out["maps_before"] >= 1
    assert out["broken"] and out["moved"] >= 8 * 256 * 1024 * 4
    assert out["size_after"] == 4096, "the writer ran after the move"
    assert out["maps_after"] == 0 and out["moved_maps"] >= 1
    assert out["same_ptrs"] and out["equal"] and out["w0"] == 1.0 and out["touched"]


def test_control_without_a_lease_sees_the_rewrite(tmp_path: Path) -> None:
    """The same rewrite with no lease reaches the mapped tensors: what the lease test's assertions rule out."""
    out = results(
        child(
            tmp_path,
            """
        d = TensorDeserializer(path, device="cpu", strategy="mmap")
        got = dict(d)
        subprocess.run([sys.executable, "-c", WRITER.replace("f.truncate(4096); ", ""), path], check=True)
        print(json.dumps({"changed": any(not torch.equal(got[k], ref[k]) for k in ref)}))
    """,
        )
    )
    assert out["changed"]


def test_own_page_mappings_move_too(tmp_path: Path) -> None:
    """Tensors moved onto mappings of their own pages (what vLLM's adoption keeps) are moved as well."""
    out = results(
        child(
            tmp_path,
            """
        lease = FileLease.take(path)
        d = TensorDeserializer(path, device="cpu", strategy="mmap")
        own = {k: d.own_pages(t) for k, t in dict(d).items()}
        d.close(); del d
        import gc; gc.collect()
        subprocess.run([sys.executable, "-c", WRITER, path], check=True)
        print(json.dumps({"equal": all(torch.equal(own[k], ref[k]) for k in ref),
                          "maps_after": maps(os.path.basename(path))}))
    """,
        )
    )
    assert out["equal"] and out["maps_after"] == 0


def test_failed_move_ends_the_process_before_the_writer_writes(tmp_path: Path) -> None:
    """No room for the copy (a file-size limit the memfd hits): the process exits with status 70 and a critical
    log line while the writer still waits; the writer's bytes land only after that."""
    proc = child(
        tmp_path,
        """
        import resource, signal
        lease = FileLease.take(path)
        got = dict(TensorDeserializer(path, device="cpu", strategy="mmap"))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        writer = subprocess.Popen([sys.executable, "-c", WRITER, path])
        time.sleep(60)
        print("still running: the failure went unnoticed")
    """,
    )
    assert proc.returncode == 70, (proc.returncode, proc.stdout[-500:], proc.stderr[-3000:])
    assert "could not be moved off it" in proc.stderr and "still running" not in proc.stdout


def test_forked_child_lets_go_of_the_descriptor(tmp_path: Path) -> None:
    """A child forked while the lease is held closes its copy of the lease's descriptor; the parent's lease still
    works (a writer after the child exits waits for the parent's move)."""
    out = results(
        child(
            tmp_path,
            """
        lease = FileLease.take(path)
        got = dict(TensorDeserializer(path, device="cpu", strategy="mmap"))
        pid = os.fork()
        if pid == 0:
            os._exit(0 if lease._fd == -1 else 1)
        _, status = os.waitpid(pid, 0)
        subprocess.run([sys.executable, "-c", WRITER, path], check=True)
        print(json.dumps({"child": os.waitstatus_to_exitcode(status), "broken": lease.broken.is_set(),
                          "equal": all(torch.equal(got[k], ref[k]) for k in ref)}))
    """,
        )
    )
    assert out == {"child": 0, "broken": True, "equal": True}


def test_refused_while_open_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 8192)
    with open(path, "r+b"), pytest.raises(LeaseUnavailableError, match="open for writing") as err:
        FileLease.take(path)
    assert isinstance(err.value, SourceError)
    FileLease.take(path).close()  # and granted once nobody writes


def test_refused_when_writers_would_not_wait_long_enough(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 8192)
    with pytest.raises(LeaseUnavailableError, match="lease-break-time"):
        FileLease.take(path, min_break_s=10**9)


def test_closed_lease_lets_writers_through_and_moves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.tensors"
    ref = {"a": torch.arange(4096, dtype=torch.float32)}
    s = TensorSerializer(str(path))
    s.write_state_dict(ref)
    s.close()
    lease = FileLease.take(path)
    got = dict(TensorDeserializer(str(path), device="cpu", strategy="mmap"))
    lease.close()
    lease.close()  # idempotent
    assert not lease._thread.is_alive()
    with open(path, "r+b") as f:  # no lease: does not wait
        f.write(b"\xff" * path.stat().st_size)
    assert not lease.broken.is_set() and lease.moved_bytes == 0
    assert not torch.equal(got["a"], ref["a"]), "without a lease the mapping shows the new bytes"
