"""Defaults and the environment variables that change them. One place, read once at import."""

from __future__ import annotations

import os

MiB = 1 << 20
GiB = 1 << 30


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError as exc:  # a typo in the environment must not silently pick a default
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from exc


# Format -----------------------------------------------------------------------------------------------
DEFAULT_ALIGNMENT = 4096  # data offsets of tensors >= this size; O_DIRECT and DMA friendly
SMALL_ALIGNMENT = 64  # smaller tensors pack at this alignment so many tiny tensors do not balloon the file
DEFAULT_BLOCK_SIZE = 16 * MiB  # digest (and encryption) block; also the default unit of a read
MAX_INDEX_BYTES = _env_int("HF_TENSORIZER_MAX_INDEX_BYTES", 256 * MiB)
# Integrations: an artifact's small files (configs, tokenizers) are fetched whole; a larger one is refused
MAX_SMALL_FILE_BYTES = _env_int("HF_TENSORIZER_MAX_SMALL_FILE_BYTES", 256 * MiB)

# Engine -----------------------------------------------------------------------------------------------
STAGING_BYTES = _env_int("HF_TENSORIZER_STAGING_BYTES", 512 * MiB)  # pinned pool cap (<= 2 GiB default)
CHUNK_BYTES = _env_int("HF_TENSORIZER_CHUNK_BYTES", 8 * MiB)  # measured best on an H200 (docs/benchmarks.md)
NUM_READERS = _env_int("HF_TENSORIZER_NUM_READERS", 0)  # 0: chosen from the CPU count
# tensor-parallel slice reads: the largest gap between two row segments read rather than cut into two requests
# (0: exact bytes, one request per segment; raise it for remote sources where requests cost more than bytes)
SLICE_MAX_GAP = _env_int("HF_TENSORIZER_SLICE_MAX_GAP", 0)


def staging_allocation_default() -> str:
    """How the pinned staging pool is allocated (read per load so benchmarks can switch it)."""
    return os.environ.get("HF_TENSORIZER_STAGING_ALLOCATION", "hugepage")  # fastest to pin, measured


# Encryption -------------------------------------------------------------------------------------------
KEY_ENV = "HF_TENSORIZER_KEY"  # a key (base64 or hex) used to open encrypted files when none is passed
ENCRYPTED_BLOCK_SIZE = 4 * MiB  # measured best for encrypted loads (docs/security.md, "Performance")

# Remote transports (HTTP, S3, Hub) -------------------------------------------------------------------
REMOTE_CONCURRENCY = _env_int("HF_TENSORIZER_REMOTE_CONCURRENCY", 16)  # keep-alive connections per remote source
REMOTE_PART_BYTES = _env_int("HF_TENSORIZER_REMOTE_PART_BYTES", 16 * MiB)  # larger reads split into ranged GETs
REMOTE_RETRIES = _env_int("HF_TENSORIZER_REMOTE_RETRIES", 8)  # consecutive failed attempts before giving up
REMOTE_TIMEOUT_S = _env_int("HF_TENSORIZER_REMOTE_TIMEOUT", 60)  # connect and per-socket-read timeout
S3_UPLOAD_PART_BYTES = _env_int("HF_TENSORIZER_S3_PART_BYTES", 64 * MiB)  # multipart part (S3 minimum: 5 MiB)
S3_UPLOAD_CONCURRENCY = _env_int("HF_TENSORIZER_S3_UPLOAD_CONCURRENCY", 4)  # parts uploading at once (memory bound)
