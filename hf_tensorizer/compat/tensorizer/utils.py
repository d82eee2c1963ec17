"""Upstream tensorizer's ``utils``: building a model without initialising or allocating its weights, and the
memory snapshots its examples print."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

import torch

Model = TypeVar("Model")


@contextlib.contextmanager
def _on_meta() -> Iterator[None]:
    # every tensor created inside lands on the meta device: no allocation, and the initialisers run on nothing;
    # TensorDeserializer.load_into_module then fills the module (what upstream's own context prepares for)
    with torch.device("meta"):
        yield


def no_init_or_tensor(loading_code: Callable[[], Model] | None = None) -> Model | contextlib.AbstractContextManager:
    """Build a model without initialising or allocating its weights (they are created on the meta device).

    Args:
        loading_code: a callable run inside the context (its result is returned), or None for a context manager.

    Returns:
        ``loading_code()``'s result, or a context manager.

    Raises:
        TypeError: ``loading_code`` is neither callable nor None.
    """
    if loading_code is None:
        return _on_meta()
    if not callable(loading_code):
        raise TypeError(f"no_init_or_tensor() expected a callable or None, got {type(loading_code).__name__}")
    with _on_meta():
        return loading_code()


def convert_bytes(num: float, decimal: bool = True) -> str:
    """``num`` bytes in human units (``"1.5 GB"``; ``decimal=False``: ``"1.4 GiB"``)."""
    step, units = (1000.0, ["B", "KB", "MB", "GB", "TB", "PB"]) if decimal else (1024.0, ["B", "KiB", "MiB", "GiB",
                                                                                       "TiB", "PiB"])  # fmt: skip
    for unit in units[:-1]:
        if abs(num) < step:
            return f"{num:.1f} {unit}"
        num /= step
    return f"{num:.1f} {units[-1]}"


def get_device() -> torch.device:
    """The current CUDA device if there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class CPUMemoryUsage(NamedTuple):
    """This process's peak resident size and the system's available memory, in bytes."""

    maxrss: int
    free: int

    @classmethod
    def now(cls) -> CPUMemoryUsage:
        maxrss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) << 10  # fmt: skip
        free = 0
        with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) << 10
        return cls(maxrss, free)

    def __str__(self) -> str:
        return f"CPU: (maxrss: {self.maxrss >> 20:,}MiB F: {self.free >> 20:,}MiB)"


def get_mem_usage() -> str:
    """A one-line summary of CPU (and, where present, CUDA) memory use."""
    out = str(CPUMemoryUsage.now())
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out += f" GPU: (U: {(total - free) >> 20:,}MiB F: {free >> 20:,}MiB T: {total >> 20:,}MiB)"
    return out


def get_gpu_name() -> str:
    """The current CUDA device's name, or ``"N/A"``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "N/A"


__all__ = ["CPUMemoryUsage", "convert_bytes", "get_device", "get_gpu_name", "get_mem_usage", "no_init_or_tensor"]
