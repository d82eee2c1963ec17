"""TensorSerializer: state dicts and modules to one file, streamed sequentially to any sink."""

from __future__ import annotations

import os
import queue
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..constants import DEFAULT_ALIGNMENT, DEFAULT_BLOCK_SIZE, ENCRYPTED_BLOCK_SIZE
from ..errors import SinkError, TensorizerError, UsageError
from ..format.dtypes import dtype_name
from ..format.index import FileIndex, TensorEntry, TensorKind, encode_header
from ..sources import Sink, open_sink
from .digest import digest_fn
from .layout import LayoutItem, compute_layout
from .memory import as_bytes, host_view

_MAC_BYTES = 16  # Poly1305 tag in front of each sealed block (crypto/seal.py's MAC_BYTES; nacl is optional)

if TYPE_CHECKING:
    from ..crypto.keys import KeySpec
    from ..crypto.seal import FileSealer

_ZEROS = bytes(1 << 16)


@dataclass
class _Pending:
    item: LayoutItem
    tensor: torch.Tensor | None  # None for aliases


def _view_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a tensor view: equal keys mean the same bytes under the same shape (tied weights)."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())


class TensorSerializer:
    """Writes tensors to one hf_tensorizer file.

    Tensors are collected by the ``write_*`` calls (references, not copies) and streamed out on
    :meth:`close`, when the whole layout is known. The sink sees strictly sequential writes; local
    files are written to a temporary name and renamed into place, so a crash never leaves a file that
    looks complete.

    Args:
        dest: a local path or URI (``s3://``, ``hf://``) or a :class:`~hf_tensorizer.sources.Sink`.
        metadata: user string map stored in the index (like safetensors' ``__metadata__``).
        alignment: data alignment of tensors of at least this size (bytes, power of two).
        block_size: digest (and encryption) block size; large tensors get one digest per block.
            Default 16 MiB, or 4 MiB for encrypted files (measured: more blocks decrypt in parallel).
        digest: ``"crc32"`` (default), ``"sha256"`` or ``"none"``.
        progress: ``True`` shows a ``tqdm`` bar for a write that runs past ~2 s, ``False`` never; ``None`` where
            someone watches (a terminal, a notebook; ``HF_TENSORIZER_PROGRESS``, see engine/progress.py).
        encryption: an ``EncryptionKey``, a ``Passphrase`` or 32 raw bytes (see hf_tensorizer.crypto):
            each block is sealed with XSalsa20-Poly1305 after its plaintext digest is taken, and the
            header is authenticated. ``None`` (default) writes a plain file.
        **sink_options: passed to the sink of a URI (e.g. ``endpoint_url`` for S3).

    Example:
        >>> with TensorSerializer("model.tensors") as s:
        ...     s.write_module(model)
    """

    def __init__(
        self,
        dest: str | os.PathLike[str] | Sink,
        *,
        metadata: Mapping[str, str] | None = None,
        alignment: int = DEFAULT_ALIGNMENT,
        block_size: int | None = None,
        digest: str = "crc32",
        progress: bool | None = None,
        encryption: KeySpec | None = None,
        **sink_options: Any,
    ) -> None:
        digest_fn(digest)  # validate early
        if alignment < 64 or alignment & (alignment - 1):
            raise UsageError(f"alignment must be a power of two >= 64, got {alignment}")
        if block_size is not None and (block_size < 4096 or block_size % 64):
            raise UsageError(f"block_size must be >= 4096 and a multiple of 64, got {block_size}")
        if encryption is not None:
            from ..crypto.keys import as_key_source

            encryption = as_key_source(encryption)  # validate early, without deriving anything yet
        self.encryption = encryption
        self._sealer: FileSealer | None = None
        if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise UsageError("metadata must map str to str")
        self._dest = dest
        self._sink_options = sink_options
        self.metadata = dict(metadata or {})
        self.alignment = alignment
        if block_size is None:
            block_size = ENCRYPTED_BLOCK_SIZE if encryption is not None else DEFAULT_BLOCK_SIZE
        self.block_size = block_size
        self.digest = digest
        self.progress = progress
        self._pending: dict[str, _Pending] = {}
        self._views: dict[tuple[Any, ...], str] = {}
        self._closed = False
        self.index: FileIndex | None = None
        #: after :meth:`close`: the version of the object written, as its sink reports it (``Sink.committed_version``)
        self.committed_version: dict[str, str] | None = None

    # ---- collecting ------------------------------------------------------------------------------

    def write_tensor(self, name: str, tensor: torch.Tensor, kind: TensorKind | str = TensorKind.PLAIN) -> None:
        """Add one tensor under ``name``. A tensor that is the same view as one already added is stored
        once and loads back as the same object (tied weights)."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise UsageError(f"tensor names must be non-empty strings, got {name!r}")
        if name in self._pending:
            raise UsageError(f"tensor {name!r} was already written")
        if not isinstance(tensor, torch.Tensor):
            raise UsageError(f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.is_meta:
            raise UsageError(f"tensor {name!r} is on the meta device and has no data to write")
        if tensor.layout != torch.strided:
            raise UsageError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors can be written")
        tensor = tensor.detach()
        if tensor.is_conj() or tensor.is_neg():  # lazy views: their memory does not hold the values
            tensor = tensor.resolve_conj().resolve_neg()
        dtype_name(tensor.dtype)  # raises UnknownDtypeError for unsupported dtypes
        kind = TensorKind(kind)
        key = _view_key(tensor)
        target = self._views.get(key) if tensor.numel() else None  # empty tensors share no bytes to tie
        if target is not None:
            item = LayoutItem(name, tensor.dtype, tuple(tensor.shape), kind, alias=target)
            self._pending[name] = _Pending(item, None)
            return
        self._views[key] = name
        self._pending[name] = _Pending(LayoutItem(name, tensor.dtype, tuple(tensor.shape), kind), tensor)

    def write_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Add every tensor of a (flat) state dict, keys kept exactly."""
        for name, tensor in state_dict.items():
            self.write_tensor(name, tensor)

    def write_module(self, module: torch.nn.Module, *, include_non_persistent_buffers: bool = False) -> None:
        """Add a module's parameters and persistent buffers under their ``state_dict()`` keys.

        Parameters and buffers are recorded as such, so ``load_into_module`` restores them faithfully;
        shared parameters (tied weights) are stored once.
        """
        params = {n: p for n, p in module.named_parameters(remove_duplicate=False)}
        buffers = dict(module.named_buffers(remove_duplicate=False))
        names = list(module.state_dict(keep_vars=True).keys())
        if include_non_persistent_buffers:
            names += [n for n in buffers if n not in names]
        for name in names:
            if name in params:
                self.write_tensor(name, params[name], TensorKind.PARAMETER)
            elif name in buffers and buffers[name] is not None:
                self.write_tensor(name, buffers[name], TensorKind.BUFFER)
            else:  # extra state: tensors only
                value = module.state_dict(keep_vars=True)[name]
                if isinstance(value, torch.Tensor):
                    self.write_tensor(name, value)

    # ---- writing ---------------------------------------------------------------------------------

    def close(self) -> FileIndex:
        """Write everything and commit the destination. Returns the written index.

        Raises:
            SinkError: the destination could not be written; nothing partial is left behind.
        """
        if self._closed:
            assert self.index is not None
            return self.index
        self._closed = True
        items = [p.item for p in self._pending.values()]
        crypt_args: dict[str, Any] = {}
        if self.encryption is not None:
            from ..crypto.seal import FileSealer
            from ..format.index import FEATURE_ENCRYPTED

            self._sealer = FileSealer(self.encryption, self.block_size)  # fresh salt: new keys per file
            sizes = {it.name: it.nbytes for it in items if it.alias is None}
            crypt_args = dict(required_features=FEATURE_ENCRYPTED, encryption=self._sealer.section,
                              crypt=self._sealer.placeholders(sizes))  # fmt: skip
        index = compute_layout(
            items, metadata=self.metadata, alignment=self.alignment, block_size=self.block_size, digest=self.digest,
            **crypt_args,
        )  # fmt: skip
        sink = open_sink(self._dest, **self._sink_options)
        final_header = self._sealer.header if self._sealer is not None else encode_header
        try:
            if sink.can_rewrite_head or (self.digest == "none" and self._sealer is None):
                header = encode_header(index)
                sink.expect_size(index.file_size)
                sink.write(header)
                self._stream(index, sink, write=True)
                index = self._with_digests(index)
                if self.digest != "none" or self._sealer is not None:
                    final = final_header(index)
                    assert len(final) == len(header)
                    sink.rewrite_head(final)
            else:  # no way back to the head: hash (and seal, for the MACs) first, then write
                self._stream(index, None, write=False)
                index = self._with_digests(index)
                sink.expect_size(index.file_size)
                sink.write(final_header(index))
                self._stream(index, sink, write=True)
            sink.commit()
            self.committed_version = sink.committed_version
        except BaseException as exc:
            sink.abort()
            if isinstance(exc, TensorizerError) or not isinstance(exc, OSError):
                raise
            raise SinkError(f"writing {getattr(sink, 'uri', self._dest)} failed: {exc}") from exc
        finally:
            self._pending.clear()
            self._views.clear()
        self.index = index
        return index

    def _stream(self, index: FileIndex, sink: Sink | None, *, write: bool) -> None:
        bar = self._bar(index.data_bytes) if write else None
        try:
            self._stream_blocks(index, sink, bar)
        finally:  # a failed write too: the bar stops being drawn
            if bar is not None:
                bar.close()

    def _stream_blocks(self, index: FileIndex, sink: Sink | None, bar: Any) -> None:
        """Hash (and seal) every block, writing the results to ``sink`` in file order when it is given.

        Hashing and sealing run on worker threads ahead of the writes (zlib / ISA-L CRC-32, hashlib and libsodium
        release the GIL), so the sink's writes overlap them instead of waiting: see :class:`_BlockPipeline`.
        """
        hash_block = digest_fn(self.digest) if self.digest != "none" else None
        sealer = self._sealer
        self._digests = {e.name: [] for e in index.data_entries}
        self._macs = {e.name: [] for e in index.data_entries}
        pos = index.data_offset

        # Sealed blocks go into buffers used again once their block is written (fresh multi-MiB buffers cost a
        # page fault per 4 KiB each time), where the sink copies what it is given (or nothing is written: the
        # first pass of a sink that cannot rewrite its head); others get a fresh buffer per block.
        reuse = sealer is not None and (sink is None or sink.copies_writes)
        spare: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        seal_bytes = index.block_size + _MAC_BYTES

        def process(name: str, i: int, block: memoryview) -> tuple[memoryview, str, str, bytearray | None]:
            digest = hash_block(block) if hash_block is not None else ""  # digests are of the plaintext
            if sealer is None:
                return block, digest, "", None
            buf = None
            if reuse:
                try:
                    buf = spare.get_nowait()
                except queue.Empty:
                    buf = bytearray(seal_bytes)
            out, mac = sealer.seal(name, i, block, buf)
            return out, digest, mac, buf

        def emit(name: str, result: tuple[memoryview, str, str, bytearray | None]) -> None:
            out, digest, mac, buf = result
            if hash_block is not None:
                self._digests[name].append(digest)
            if sealer is not None:
                self._macs[name].append(mac)
            if sink is not None:
                sink.write(out)
            if bar is not None:
                bar.update(len(out))
            if buf is not None:
                spare.put(buf)

        work = hash_block is not None or sealer is not None
        total = index.data_bytes if work else 0
        with _BlockPipeline(total, index.block_size, sealed=sealer is not None, emit=emit) as pipe:
            for entry in index.data_entries:
                tensor = self._pending[entry.name].tensor
                assert tensor is not None
                if sink is not None and entry.offset > pos:
                    pipe.drain()
                    _write_zeros(sink, entry.offset - pos)
                pos = entry.offset + entry.length
                reused = tensor.device.type == "cuda"  # its blocks are two pinned buffers, refilled as we go
                for i, block in enumerate(_host_blocks(tensor, index.block_size)):
                    pipe.submit(entry.name, process, i, block)
                    if reused:
                        pipe.drain()

    def _with_digests(self, index: FileIndex) -> FileIndex:
        if self.digest == "none" and self._sealer is None:
            return index
        sealed = self._sealer is not None
        tensors = {
            n: e if e.alias is not None else TensorEntry(
                e.name, e.dtype, e.shape, e.kind, e.offset, e.length, tuple(self._digests[n]), None,
                {"macs": self._macs[n]} if sealed else e.crypt,
            )
            for n, e in index.tensors.items()
        }  # fmt: skip
        index.tensors = tensors
        return index

    def _bar(self, total: int) -> Any:
        from .progress import Progress

        return Progress("serializing", total, show=self.progress)  # drawn past ~2 s, where watched (progress.py)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("serializer is closed")

    def __enter__(self) -> TensorSerializer:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            self._pending.clear()


class _BlockPipeline:
    """Runs ``fn(name, i, block)`` for the blocks of a save on worker threads, ``emit`` on this one in order.

    Why: hashing a block (CRC-32 at 1.7-4.7 GB/s per core on the dev VM) and writing it to the page cache
    (about 1.2 GB/s there) were done one after the other; with the hashing of the next blocks on other threads
    the writes go on meanwhile, and sealing (libsodium) spreads over every core. At most ``window`` blocks are
    in flight, so the memory beyond the tensors is bounded: nothing for plain saves (blocks are views of the
    tensors), ``window`` sealed blocks for encrypted ones. Small saves (under ``INLINE_BYTES``) and machines
    with one core run everything inline: starting threads would cost more than it saves.
    """

    INLINE_BYTES = 32 << 20
    WINDOW_BYTES = 256 << 20  # sealed blocks in flight at most (each a fresh buffer of one block)

    def __init__(self, total: int, block_size: int, *, sealed: bool,
                 emit: Callable[[str, Any], None]) -> None:  # fmt: skip
        cores = _cores()
        self.workers = 0 if total < self.INLINE_BYTES or cores < 2 else min(cores, 16 if sealed else 4)
        self.window = max(2, min(2 * self.workers + 2, self.WINDOW_BYTES // block_size if sealed else 64))
        self._emit = emit
        self._pending: deque[tuple[str, Future[Any]]] = deque()
        self._pool = ThreadPoolExecutor(self.workers, "hf-tensorizer-write") if self.workers else None

    def submit(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        if self._pool is None:
            self._emit(name, fn(name, *args))
            return
        self._pending.append((name, self._pool.submit(fn, name, *args)))
        while len(self._pending) > self.window:
            self._emit_one()

    def drain(self) -> None:
        while self._pending:
            self._emit_one()

    def _emit_one(self) -> None:
        name, fut = self._pending.popleft()
        self._emit(name, fut.result())

    def __enter__(self) -> _BlockPipeline:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            if self._pool is not None:
                for _, fut in self._pending:
                    fut.cancel()
                self._pool.shutdown(wait=True)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _write_zeros(sink: Sink, n: int) -> None:
    while n:
        k = min(n, len(_ZEROS))
        sink.write(_ZEROS[:k])
        n -= k


def _host_blocks(tensor: torch.Tensor, block: int) -> Iterator[memoryview]:
    """The tensor's bytes as host memoryviews of at most ``block`` bytes each.

    CPU tensors are viewed in place. CUDA tensors are copied out through two pinned buffers on a side
    stream: block i+1 is in flight while the caller writes block i, so the GPU copy never stalls the sink.
    """
    if tensor.device.type != "cuda":
        t = tensor.contiguous() if tensor.device.type == "cpu" else tensor.contiguous().cpu()  # kept alive below
        view = host_view(t)
        for start in range(0, len(view), block):
            yield view[start : start + block]
        return
    src = as_bytes(tensor.contiguous())
    n = src.numel()
    size = min(block, n)
    if size == 0:
        return
    stream = torch.cuda.Stream(device=tensor.device)
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    bufs = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    events = [torch.cuda.Event(), torch.cuda.Event()]

    def launch(i: int, start: int) -> None:
        with torch.cuda.stream(stream):
            length = min(size, n - start)
            bufs[i][:length].copy_(src[start : start + length], non_blocking=True)
            events[i].record(stream)

    starts = list(range(0, n, size))
    launch(0, 0)
    for j, start in enumerate(starts):
        cur = j % 2
        if j + 1 < len(starts):
            launch(1 - cur, starts[j + 1])
        events[cur].synchronize()
        yield host_view(bufs[cur])[: min(size, n - start)]
