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
# GPU loads: make the CUDA context and the pinned staging block in the background as soon as a load is known
PREWARM = _env_int("HF_TENSORIZER_PREWARM", 1)
CHUNK_BYTES = _env_int("HF_TENSORIZER_CHUNK_BYTES", 8 * MiB)  # measured best on an H200 (docs/benchmarks.md)
NUM_READERS = _env_int("HF_TENSORIZER_NUM_READERS", 0)  # 0: chosen from the CPU count
# tensor-parallel slice reads: the largest gap between two row segments read rather than cut into two requests
# (0: exact bytes, one request per segment; raise it for remote sources where requests cost more than bytes)
SLICE_MAX_GAP = _env_int("HF_TENSORIZER_SLICE_MAX_GAP", 0)
# Local saves write with O_DIRECT through a few page-aligned buffers (sources/file.py): 0 writes through the page
# cache instead (then a file just written is cached for the next read)
DIRECT_WRITE = _env_int("HF_TENSORIZER_DIRECT_WRITE", 1) != 0
# Benches: our vLLM plugin also registers the peer load format the vLLM benches compare against
# (integrations/adapters/vllm/peers.py: vLLM's tensorizer loader plus the post-processing step it skips)
VLLM_BENCH_PEERS = _env_int("HF_TENSORIZER_VLLM_BENCH_PEERS", 0) != 0


def staging_allocation_default() -> str:
    """How the pinned staging pool is allocated (read per load so benchmarks can switch it)."""
    return os.environ.get("HF_TENSORIZER_STAGING_ALLOCATION", "hugepage")  # fastest to pin, measured


# Encryption -------------------------------------------------------------------------------------------
KEY_ENV = "HF_TENSORIZER_KEY"  # a key (base64 or hex) used to open encrypted files when none is passed
ENCRYPTED_BLOCK_SIZE = 4 * MiB  # measured best for encrypted loads (docs/security.md, "Performance")

# Remote transports (HTTP, S3, Hub) -------------------------------------------------------------------
REMOTE_CONCURRENCY = _env_int("HF_TENSORIZER_REMOTE_CONCURRENCY", 16)  # keep-alive connections per remote source
REMOTE_PART_BYTES = _env_int("HF_TENSORIZER_REMOTE_PART_BYTES", 16 * MiB)  # larger reads split into ranged GETs
REMOTE_ADAPT = _env_int("HF_TENSORIZER_REMOTE_ADAPT", 1) != 0  # remote reads adapt to the server (sources/tuning.py)
REMOTE_RETRIES = _env_int("HF_TENSORIZER_REMOTE_RETRIES", 8)  # consecutive failed attempts before giving up
REMOTE_TIMEOUT_S = _env_int("HF_TENSORIZER_REMOTE_TIMEOUT", 60)  # connect and per-socket-read timeout
# Bounded time (docs/remote.md, "Timeouts and deadlines"): one open or one read call, retries and waits included,
# ends by this deadline; engine reads are chunks (8 MiB), so only a broken server or link reaches it.
REMOTE_DEADLINE_S = _env_int("HF_TENSORIZER_REMOTE_DEADLINE", 900)
# A connection whose body delivers fewer than MIN_RATE x RATE_WINDOW bytes (60 KiB) in RATE_WINDOW seconds is a
# trickle, not a slow link: the read fails. 0 turns the rule off.
REMOTE_MIN_RATE = _env_int("HF_TENSORIZER_REMOTE_MIN_RATE", 2048)  # bytes per second
REMOTE_RATE_WINDOW_S = _env_int("HF_TENSORIZER_REMOTE_RATE_WINDOW", 30)
REMOTE_MAX_RETRY_AFTER_S = _env_int("HF_TENSORIZER_REMOTE_MAX_RETRY_AFTER", 30)  # longest wait a Retry-After gets
REMOTE_CONNECT_RETRIES = _env_int("HF_TENSORIZER_REMOTE_CONNECT_RETRIES", 2)  # refused: quick retries (~0.75 s)
# Ranged S3 reads through presigned URLs on our HTTP pools (boto3 signs; ~5x less CPU per request than
# get_object); 0: every range is a boto3 get_object. See sources/s3_presigned.py for when it steps aside.
S3_PRESIGNED = _env_int("HF_TENSORIZER_S3_PRESIGNED", 1) != 0
# Multipart uploads hold (concurrency + 2) x part bytes (80 MiB). 8 x 8 MiB against moto on the dev VM: 0.95-1.01x
# boto3 upload_file (its own 10 x 8 MiB; median rounds, with part checksums), where 4 x 64 MiB was 0.5x and held
# 400 MiB (bench save --s3)
S3_UPLOAD_PART_BYTES = _env_int("HF_TENSORIZER_S3_PART_BYTES", 8 * MiB)  # multipart part (S3 minimum: 5 MiB)
S3_UPLOAD_CONCURRENCY = _env_int("HF_TENSORIZER_S3_UPLOAD_CONCURRENCY", 8)  # parts uploading at once (memory bound)
# Part checksums of uploads, as boto3 sends them by default: "crc32" (each part's CRC32, checked by the store on
# receipt; the object keeps a composite CRC32) or "none". Unset: "none" where AWS_REQUEST_CHECKSUM_CALCULATION is
# "when_required" (the setting that keeps boto3 itself working with stores predating the 2025 integrity headers)
S3_UPLOAD_CHECKSUM = os.environ.get("HF_TENSORIZER_S3_UPLOAD_CHECKSUM", "").strip().lower() or (
    "none" if os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "").strip().lower() == "when_required" else "crc32"
)

# Progress bars (engine/progress.py): 1 shows them anywhere, 0 never; unset: only in a terminal or a notebook ------
PROGRESS_ENV = "HF_TENSORIZER_PROGRESS"
