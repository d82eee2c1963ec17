"""safetensors' reader API (``safe_open``, ``load_file``, ``load``) served by hf_tensorizer's engine.

Code written against ``safetensors`` changes one import::

    from hf_tensorizer.compat.safetensors import safe_open, load_file

    with safe_open("model.safetensors", framework="pt", device="cpu") as f:
        w = f.get_slice("lm_head.weight")[:, :128]   # reads only those bytes

Any file our engine reads opens here: safetensors, hf_tensorizer and upstream tensorizer files, local or remote
(``s3://``, ``hf://``, ...). Differences from safetensors' own reader are listed in docs/compat.md.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

import torch

from ..engine.reader import TensorDeserializer
from ..errors import UsageError

if TYPE_CHECKING:
    from ..engine.slices import HandleSlice

__all__ = ["SafeOpen", "load", "load_file", "safe_open"]

_FRAMEWORKS = ("pt", "torch", "pytorch")
#: safetensors' ``backend=`` as our ``strategy=``: its mmap is our CPU default (a mapped load, local files)
_BACKENDS = {"mmap": "auto", "pread": "pread"}


def _device(device: str | int | torch.device) -> torch.device:
    """safetensors' device spellings: ``"cpu"``, ``"cuda:1"``, a ``torch.device`` or a bare CUDA index."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device)
    return torch.device(device)


def _strategy(backend: str) -> str:
    if backend not in _BACKENDS:
        raise UsageError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    return _BACKENDS[backend]


class SafeOpen:
    """An open file: safetensors' ``safe_open`` handle over a lazy :class:`~hf_tensorizer.TensorDeserializer`.

    Tensors are read when asked for (``get_tensor``, ``get_slice``); after ``close()`` (or the ``with`` block)
    every call raises :class:`~hf_tensorizer.errors.ClosedError`.

    Args:
        filename: path, URI or ``Source``.
        framework: ``"pt"`` (this reader builds torch tensors only).
        device: where tensors go (``"cpu"``, ``"cuda:0"``, ``0``).
        backend: ``"mmap"`` (our default strategy: mapped on CPU for local files) or ``"pread"``.
        **options: further ``TensorDeserializer`` arguments (``encryption=``, ``endpoint_url=``...).

    Raises:
        UsageError: a framework other than torch, or an unknown backend.
        SourceNotFoundError: the file does not exist (a ``FileNotFoundError``).
        FormatError: the file is not valid.
    """

    def __init__(self, filename: str | os.PathLike[str] | Any, framework: str = "pt",
                 device: str | int | torch.device = "cpu", *, backend: str = "mmap",
                 **options: Any) -> None:  # fmt: skip
        if framework not in _FRAMEWORKS:
            raise UsageError(f"framework={framework!r}: this reader builds torch tensors only (framework='pt')")
        options.setdefault("strategy", _strategy(backend))
        self._d = TensorDeserializer(filename, device=_device(device), lazy=True, **options)

    def keys(self) -> list[str]:
        """The tensor names, sorted (as safetensors sorts them)."""
        return sorted(self._d.keys())

    def offset_keys(self) -> list[str]:
        """The tensor names in the order of their data in the file."""
        index = self._d.index
        return sorted(self._d.keys(), key=lambda n: (index.tensors[n].offset, n))

    def metadata(self) -> dict[str, str] | None:
        """The ``__metadata__`` map, or None when the file has none."""
        return self._d.metadata or None

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, read now.

        Raises:
            KeyError: no tensor of that name.
            ClosedError: the handle was closed.
        """
        return self._d[name]

    def get_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, in file order."""
        return {n: self._d[n] for n in self.offset_keys()}

    def get_slice(self, name: str) -> HandleSlice:
        """One tensor to read in part (``get_shape()``, ``get_dtype()``, ``[...]``); see ``TensorDeserializer``."""
        return self._d.get_slice(name)

    def close(self) -> None:
        """Release the file; tensors already taken stay valid."""
        self._d.close()

    def __enter__(self) -> SafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def safe_open(filename: str | os.PathLike[str] | Any, framework: str = "pt", device: str | int | torch.device = "cpu",
              *, backend: str = "mmap", **options: Any) -> SafeOpen:  # fmt: skip
    """Open ``filename`` the way ``safetensors.safe_open`` does (see :class:`SafeOpen`)."""
    return SafeOpen(filename, framework, device, backend=backend, **options)


def load_file(filename: str | os.PathLike[str] | Any, device: str | int | torch.device = "cpu", *,
              backend: str = "mmap", **options: Any) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every tensor of ``filename``, loaded at once by the engine's parallel readers.

    Args:
        filename: path, URI or ``Source``.
        device: where tensors go.
        backend: ``"mmap"`` (our default strategy) or ``"pread"``.
        **options: further ``TensorDeserializer`` arguments.

    Returns:
        name -> tensor, in file order.

    Raises:
        SourceNotFoundError: the file does not exist (a ``FileNotFoundError``).
        FormatError: the file is not valid.
    """
    options.setdefault("strategy", _strategy(backend))
    with TensorDeserializer(filename, device=_device(device), **options) as d:
        index = d.index
        return {n: d[n] for n in sorted(d, key=lambda n: (index.tensors[n].offset, n))}


def load(data: bytes) -> dict[str, torch.Tensor]:
    """Every tensor of a file held in memory (``safetensors.torch.load``).

    Raises:
        FormatError: the bytes are not a valid file.
    """
    return load_file(io.BytesIO(bytes(data)))
