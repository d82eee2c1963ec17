"""The handle surface of :class:`~hf_tensorizer.engine.reader.TensorDeserializer` that safetensors' ``safe_open``
users expect: ``get_slice`` (a lazy box read of one tensor), and a closed handle that refuses everything.

Kept apart from the reader so that file stays about loading; the reader mixes :class:`HandleMixin` in. The slices
themselves (:class:`~hf_tensorizer.engine.slices.HandleSlice`) are imported by the first ``get_slice``.
"""

from __future__ import annotations

import importlib
from collections.abc import KeysView, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ClosedError, UsageError

if TYPE_CHECKING:
    import torch

    from .slices import HandleSlice, SliceMetrics
# .slices (get_slice) is imported on first use: a plain load never reads a box (first use, issue 24)


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
            from .slices import SliceMetrics

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
        from .slices import HandleSlice

        return HandleSlice(self, name)


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


def __getattr__(name: str) -> Any:  # HandleSlice: defined in engine.slices, imported on first use
    if name == "HandleSlice":
        return importlib.import_module(".slices", __package__).HandleSlice
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
