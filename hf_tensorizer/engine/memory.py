"""Byte-level views of tensor memory, whatever the dtype (bf16, fp8 and fp4 have no numpy type)."""

from __future__ import annotations

import ctypes

import torch


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's bytes (any device, any dtype, 0-d included)."""
    if not t.is_contiguous():
        raise ValueError("as_bytes needs a contiguous tensor")
    flat = t.reshape(-1) if t.dim() != 1 else t
    if flat.dtype == torch.uint8:
        return flat
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def host_view(t: torch.Tensor) -> memoryview:
    """A writable ``memoryview`` over a CPU tensor's bytes, without copying.

    The caller keeps ``t`` alive as long as the view is used.
    """
    if t.device.type != "cpu":
        raise ValueError("host_view needs a CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")
