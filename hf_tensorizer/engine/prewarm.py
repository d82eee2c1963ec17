"""First-use work of a GPU load that does not depend on the file, started before the file is read.

A fresh process pays for the CUDA context and for page-locking the staging block on its first load; pinning
holds the driver lock, so done during the load it stalls every reader thread's copies (0.068 s for the huge-page
block on an H200, docs/benchmarks.md). :func:`prewarm` starts both on a background thread as soon as a load is
known — ``TensorDeserializer`` before it reads the index, ``from_pretrained`` before it fetches the config and
builds the model on meta — and the load's staging pool takes the block when it needs it (waiting for it if it is
still being made). ``HF_TENSORIZER_PREWARM=0`` turns it off.
"""

from __future__ import annotations

import os
import threading

import torch

from .. import constants
from .staging import footprint, pool_shape, prewarm_block


def staging_estimate(*, chunk_bytes: int | None = None, staging_bytes: int | None = None,
                     num_readers: int | None = None) -> int:  # fmt: skip
    """The staging block a GPU load with these options makes: one buffer per reader plus two, each the chunk size
    rounded up to a power of two, within the staging cap (see ``TensorDeserializer``)."""
    default_readers = constants.NUM_READERS if constants.NUM_READERS > 0 else min(16, max(4, os.cpu_count() or 2))
    shape = pool_shape(chunk_bytes or constants.CHUNK_BYTES, num_readers or default_readers,
                       staging_bytes or constants.STAGING_BYTES)  # fmt: skip
    return footprint(*shape)


def prewarm(device: torch.device | str | int, *, allocation: str | None = None, chunk_bytes: int | None = None,
            staging_bytes: int | None = None, num_readers: int | None = None) -> threading.Thread | None:  # fmt: skip
    """Start making the CUDA context and the pinned staging block of a load onto ``device``.

    A no-op for non-CUDA devices, without a GPU, with a staging allocation other than ``"hugepage"`` (those pin
    per buffer), or with ``HF_TENSORIZER_PREWARM=0``.

    Returns:
        The background thread, or ``None`` when nothing was started.
    """
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if not constants.PREWARM or device.type != "cuda" or not torch.cuda.is_available():
        return None
    if (allocation or constants.staging_allocation_default()) != "hugepage":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    nbytes = staging_estimate(chunk_bytes=chunk_bytes, staging_bytes=staging_bytes, num_readers=num_readers)
    return prewarm_block(nbytes, pin=True, device=index)
