"""The benchmark modes that start the loopback test servers are reachable from ``hf-tensorizer bench``."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "hf_tensorizer"]


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("artifact", "--latency"),
        ("fsspec", "--part-mib"),
        ("vllm", "--runs"),
        ("remote", "--sweep"),  # modes with their own parser get every argument after the mode, --help included
        ("crypto", "--decrypt-mib"),
    ],
)
def test_mode_is_registered(mode: str, says: str) -> None:
    out = subprocess.run([*CLI, "bench", mode, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert says in out.stdout


def test_fsspec_mode_reads_every_store() -> None:
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    out = subprocess.run(
        [*CLI, "bench", "fsspec", "--mib", "1", "--rounds", "1", "--server", "stdlib"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "GB/s" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| HTTP (ours) ← stdlib",
        "| gs:// FsspecSource (cat_file) ← GCS emulator",
        "| gs:// file handles (readinto) ← GCS emulator",
        "| memory:// FsspecSource (cat_file)",
        "| memory:// file handles (readinto)",
    ]
