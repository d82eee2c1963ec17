"""The handle surface of :class:`~hf_tensorizer.engine.reader.TensorDeserializer` that safetensors' ``safe_open``
users expect: ``get_slice`` (a lazy box read of one tensor), and a closed handle that refuses everything.

Kept apart from the reader so that file stays about loading; the reader mixes :class:`HandleMixin` in.
"""

from __future__ import annotations

from collections.abc import KeysView, Mapping
from typing import Any

import torch

from ..errors import ClosedError, UsageError
from .pipeline import Verifier
from .slices import SliceMetrics, TensorSlice


class HandleSlice(TensorSlice):
    """A :class:`~.slices.TensorSlice` of an open deserializer: boxes land on its device, cast to its ``dtype=``,
    and reading one after ``close()`` raises :class:`~hf_tensorizer.errors.ClosedError`."""

    def __init__(self, owner: Any, name: str) -> None:  # the reader's TensorDeserializer (it imports this module)
        verifier = Verifier(owner.index) if owner.verify_hash else None
        super().__init__(owner._source, owner.index, name, owner.slice_metrics, threads=owner.num_readers,
                         transform=owner.transform, verifier=verifier)  # fmt: skip
        self._owner = owner

    def read(self, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """The box ``ranges`` (``[start, stop)`` per dimension), read from the source now.

        Raises:
            ClosedError: the deserializer was closed.
        """
        self._owner._check_open()
        t = super().read(ranges)
        return self._owner._finish(self.entry, t).to(self._owner.device)


class HandleMixin:
    """``get_slice``, ``keys`` and the closed-state check of ``TensorDeserializer`` (see the module docstring)."""

    _closed: bool
    _wanted: frozenset[str]

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self!r} is closed: open the file again to read from it")

    def own_pages(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A tensor this deserializer mapped (``strategy="mmap"``), moved onto a mapping of only its own pages, so
        that keeping it does not keep the whole file mapped (:meth:`.mapping.FileMapping.own_pages`; vLLM's
        parameters adopt tensors this way, :mod:`hf_tensorizer.integrations.adapters.vllm.adopt`).

        Args:
            tensor: a tensor returned by this deserializer (or a contiguous view of one).

        Returns:
            The same bytes on their own mapping, or ``None`` when ``tensor`` is not a view of this
            deserializer's mapping (a copy, another file's tensor, a load that did not map).

        Raises:
            ClosedError: the deserializer is closed.
            ObjectChangedError: the file is now shorter than when it was mapped.
        """
        self._check_open()
        mapping, fd = getattr(self, "_mapping", None), self._source.fileno()  # type: ignore[attr-defined]
        return None if mapping is None or fd is None else mapping.own_pages(fd, tensor)

    def keys(self) -> KeysView[str]:
        """The selected tensor names, in file order.

        Raises:
            ClosedError: the deserializer was closed.
        """
        self._check_open()
        return KeysView(self)  # type: ignore[arg-type]

    @property
    def slice_metrics(self) -> SliceMetrics:
        """What the ``get_slice`` reads of this deserializer read so far (bytes, requests, over-read)."""
        if getattr(self, "_slice_metrics", None) is None:
            self._slice_metrics = SliceMetrics()
        return self._slice_metrics

    def get_slice(self, name: str) -> HandleSlice:
        """One tensor, lazily, to read in part: safetensors' ``PySafeSlice`` surface.

        ``get_shape()``, ``get_dtype()`` (safetensors' names: ``"BF16"``, ...) and ``slice[key]``, where ``key``
        is ``...``, ints and step-1 slices per dimension: only the bytes of that box are read (encrypted or
        ``verify_hash`` files: the blocks around it, decrypted and checked). Other keys read the whole tensor.

        Args:
            name: a tensor of this deserializer's selection (``filter=``).

        Returns:
            The slice; it reads through this deserializer, so it is valid until :meth:`close`.

        Raises:
            ClosedError: the deserializer was closed.
            KeyError: ``name`` is not in the selection.
        """
        self._check_open()
        if name not in self._wanted:
            raise KeyError(name)
        return HandleSlice(self, name)  # type: ignore[arg-type]


# keyword spellings of CoreWeave's tensorizer: not ours, but worth a pointer (hf_tensorizer.upstream.compat)
_UPSTREAM_SPELLINGS = ("filter_func", "lazy_load", "plaid_mode", "plaid_mode_buffers", "s3_access_key_id",
                       "s3_secret_access_key", "s3_endpoint")  # fmt: skip


def refuse_upstream_spellings(options: Mapping[str, Any]) -> None:
    """Raise :class:`UsageError` naming ours when upstream tensorizer's keyword spellings reach the engine."""
    found = [k for k in _UPSTREAM_SPELLINGS if k in options]
    if found:
        raise UsageError(
            f"{found} are upstream tensorizer spellings: use ours (filter=, lazy=, endpoint_url= with AWS credentials "
            "from the environment or profile=) or hf_tensorizer.upstream.compat_kwargs(...); see docs/compat.md"
        )
