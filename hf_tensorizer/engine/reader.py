"""TensorDeserializer: an hf_tensorizer file as a read-only mapping of tensors, loaded fast."""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..constants import CHUNK_BYTES, NUM_READERS, STAGING_BYTES, staging_allocation_default
from ..errors import TensorizerError, UsageError
from ..format.dtypes import is_floating
from ..format.index import FileIndex, TensorEntry, TensorKind
from ..sources import Source, hold_transfer, open_source
from . import pagecache, progress
from .decrypt import choose_transform
from .handle import HandleMixin, refuse_upstream_spellings
from .header import read_index
from .mapping import READ_THROUGH_PIECE_BYTES, FileMapping
from .pipeline import LoadMetrics, StageTimes, Transform, Verifier, load_cpu, load_registered, load_staged

if TYPE_CHECKING:
    from ..crypto.keys import KeySpec
    from .modules import LoadInfo
    from .plan import Chunk
# .plan, .staging and .memory's views are imported by the paths that use them: a warm mapped load needs none
# .distributed (+ rankwatch) and .modules are imported where used: a plain load needs neither (first use, issue 24)

STRATEGIES = ("auto", "mmap", "pread", "odirect", "register")


Filter = Callable[[str], bool] | Iterable[str] | None


def _default_threads(device: torch.device, source: Source) -> int:
    if NUM_READERS > 0:
        return NUM_READERS
    cpus = os.cpu_count() or 2
    if source.fileno() is None:
        return max(4, source.preferred_concurrency)
    # Local reads wait on the disk when the file is cold and on faulting in fresh pages when it is warm: more readers
    # than cores keep more requests in flight (2-core VM, 0.92 GB: warm 1 reader 1.6 GB/s, 4 readers 3.0; cold, 4
    # alternating fresh processes, 4 readers 1.10-1.36, 8 readers 1.30-1.48; docs/benchmarks.md). Mapping a warm
    # file's pages is CPU work, so a mapped load caps those threads at the core count itself.
    return min(16, max(4, cpus)) if device.type == "cuda" else min(16, max(8, cpus))


class TensorDeserializer(HandleMixin, Mapping[str, torch.Tensor]):
    """A read-only mapping from tensor name to tensor, streamed from any source.

    Construction loads every selected tensor (unless ``lazy``); afterwards the mapping holds finished
    tensors that own their memory. It is also a context manager and can fill a module in place.

    Args:
        source: local path, URI (``file://``, ``http(s)://``, ``s3://``, ``hf://``) or a ``Source``.
        device: where tensors go (``"cpu"`` default, ``"cuda"``, ``"cuda:1"``, a ``torch.device``).
        dtype: cast floating tensors to this dtype (ints, bools, complex and packed types are kept).
        filter: names to load, as a predicate or an iterable; other tensors' bytes are never read.
        lazy: load each tensor on first access instead of all at once.
        verify_hash: check every block against its digest while streaming; a mismatch raises
            ``HashMismatchError`` naming the tensor.
        num_readers: reader threads (default: from the CPU count and the source).
        chunk_bytes: the read unit (default 8 MiB); forced to the block size when verifying or decrypting.
        staging_bytes: cap of the staging pool (GPU loads); default 512 MiB, at most 2 GiB advised.
        staging_allocation: how pinned buffers are made: ``"lazy"``, ``"block"`` or ``"hugepage"``
            (see ``engine.staging.StagingPool``; default from ``HF_TENSORIZER_STAGING_ALLOCATION``).
        strategy: ``"auto"`` (CPU: ``"mmap"`` for a local, unencrypted file read without a cast, else
            ``"pread"``; CUDA: ``"pread"`` or, for a cold local file, ``"odirect"``), ``"mmap"`` (tensors
            are zero-copy views of a private copy-on-write mapping of the file; a cold file is first read
            through the page cache by ``num_readers`` streams, see ``engine.mapping``; CPU, local files),
            ``"pread"`` (parallel reads into new tensors), ``"odirect"`` (bypass the page cache, for cold local
            files), ``"register"`` (pin page-cache pages in place; CUDA, local files). ``metrics.strategy`` says
            which one ran.
        mmap: force ``strategy="mmap"`` (CPU, local, unencrypted files; with ``dtype=`` the cast copies).
        transform: in-place per-piece step applied after reading (the decryption hook).
        encryption: key or passphrase of an encrypted file (``EncryptionKey``, ``Passphrase`` or 32
            bytes; see hf_tensorizer.crypto). ``None`` falls back to ``HF_TENSORIZER_KEY``; ``False``: the
            file is plain, ignore the variable. The header is authenticated before anything else happens; a
            key (given or set) for a file that is not encrypted raises ``DecryptionError`` (no silent downgrade).
        index: the index of ``source``, when the caller already read it from this same open source
            (``read_index(source)``): saves reading the header again (a request, for remote sources).
        distributed: replicas over torch.distributed: every rank of ``process_group`` calls this with the same
            file and options, reads ~1/N of the bytes from the source and receives the rest from the other ranks
            (``engine.distributed``; docs/distributed.md). Needs an initialised process group; not ``lazy``.
        process_group: the ranks sharing the load (default: the default group).
        **source_options: passed to the transport when ``source`` is a URI.

    Raises:
        FormatError: the file is not valid (typed subclasses say why).
        SourceError: the bytes could not be read.
        HashMismatchError: with ``verify_hash``, data does not match its digest.
        MissingKeyError: the file is encrypted and no key was given or found in the environment.
        DecryptionError: wrong key or passphrase, or the file was tampered with.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Source,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        filter: Filter = None,
        lazy: bool = False,
        verify_hash: bool = False,
        num_readers: int | None = None,
        chunk_bytes: int | None = None,
        staging_bytes: int | None = None,
        staging_allocation: str | None = None,
        strategy: str = "auto",
        mmap: bool = False,
        transform: Transform | None = None,
        encryption: KeySpec | Literal[False] | None = None,
        index: FileIndex | None = None,
        distributed: bool = False,
        process_group: Any = None,
        **source_options: Any,
    ) -> None:
        _check_arguments(strategy, dtype, num_readers, chunk_bytes, staging_bytes, staging_allocation)
        if device is not None and str(device) != "cpu" and strategy not in ("register", "mmap"):  # pin meanwhile
            from .prewarm import prewarm  # CUDA-only work: imported on first use, not with the reader

            prewarm(device, allocation=staging_allocation, chunk_bytes=chunk_bytes, staging_bytes=staging_bytes,
                    num_readers=num_readers)  # fmt: skip
        refuse_upstream_spellings(source_options)
        self._owns_source = not isinstance(source, Source)
        if distributed:
            from .distributed import begin_replicas, handshake, identity
        watch = begin_replicas(lazy, mmap, strategy, process_group) if distributed else None
        try:  # nothing may leak when construction fails: descriptors, pools, connections; replicas hear of it
            self._source = progress.counted(open_source(source, **source_options))  # bytes for a progress bar
            self._closed = False
            if index is not None and (self._owns_source or index.file_size != self._source.size):
                raise UsageError("index= must come from read_index() of the same open Source")
            self.index = index if index is not None else read_index(self._source)
            transform = choose_transform(self.index, encryption, transform, self._source.uri)
            self.device = torch.device(device) if device is not None else torch.device("cpu")
            if self.device.type == "cuda":
                if not torch.cuda.is_available():
                    raise UsageError(f"device {self.device} requested, but torch sees no CUDA GPU")
                if self.device.index is None:
                    self.device = torch.device("cuda", torch.cuda.current_device())
            if verify_hash and self.index.digest == "none" and transform is None:  # MACs still verify encrypted
                raise UsageError(
                    f"{self._source.uri} has no digests to verify (safetensors, upstream tensorizer or digest='none'; "
                    "upstream files: hf_tensorizer.upstream.open_upstream(..., verify_hash=True))"
                )
            self.dtype = dtype
            self.verify_hash = verify_hash
            self.num_readers = num_readers or _default_threads(self.device, self._source)
            if transform is not None and not num_readers and NUM_READERS <= 0:
                # decryption is CPU-bound and releases the GIL: use every core (docs/security.md)
                self.num_readers = max(self.num_readers, min(32, os.cpu_count() or 1))
            self.chunk_bytes = chunk_bytes or self._source.preferred_chunk_bytes or CHUNK_BYTES
            hold_transfer(self._source, num_readers=num_readers, chunk_bytes=chunk_bytes)  # remote: caller's wins
            self.staging_bytes = staging_bytes or STAGING_BYTES
            self.staging_allocation = staging_allocation or staging_allocation_default()
            self.strategy = strategy
            self.mmap = mmap
            self.distributed, self.process_group = distributed, process_group
            self.transform = transform
            if (mmap or strategy == "mmap") and (
                self.device.type != "cpu" or self._source.fileno() is None or transform is not None
            ):
                raise UsageError("mmap needs device='cpu', a local file, and no encryption or transform")
            if strategy == "register" and verify_hash:
                raise UsageError("strategy='register' copies straight from the page cache and cannot verify digests")
            self._names = self._select(filter)
            self._wanted = frozenset(self._names)
            self._tensors: dict[str, torch.Tensor] = {}
            self._lock = threading.Lock()
            self._mapping: FileMapping | None = None
            self.metrics = LoadMetrics()
            if watch is not None:  # the ranks agree on what they load before any byte is exchanged
                plan = dict(names=self._names, dtype=str(dtype), verify_hash=verify_hash, chunk_bytes=self.chunk_bytes)
                handshake(watch, identity(self._source, self.index, encrypted=transform is not None, **plan))
            if not lazy:
                self._load([self.index.tensors[n] for n in self._names])
        except BaseException as exc:
            if watch is not None:
                watch.fail(exc)
            self.close()
            raise

    # ---- Mapping ---------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        self._check_open()  # a closed handle refuses everything, as safetensors' does (docs/compat.md)
        if name not in self._wanted:
            raise KeyError(name)
        t = self._tensors.get(name)
        if t is None:
            with self._lock:
                if name not in self._tensors:
                    self._load([self.index.tensors[name]])
            t = self._tensors[name]
        return t

    def __iter__(self) -> Iterator[str]:
        self._check_open()
        return iter(self._names)

    def __len__(self) -> int:
        self._check_open()
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        self._check_open()
        return name in self._wanted

    @property
    def metadata(self) -> dict[str, str]:
        """The user metadata map stored with the tensors."""
        self._check_open()
        return dict(self.index.metadata)

    def kind(self, name: str) -> TensorKind:
        """Whether ``name`` was a parameter, a buffer, or a plain tensor when written."""
        return self.index.tensors[name].kind

    # ---- loading ---------------------------------------------------------------------------------

    def _select(self, filt: Filter) -> list[str]:
        names = list(self.index.tensors)
        if filt is None:
            return names
        if callable(filt):
            return [n for n in names if filt(n)]
        wanted = set(filt)
        unknown = wanted.difference(self.index.tensors)
        if unknown:
            raise UsageError(f"filter names tensors not in the file: {sorted(unknown)[:5]}")
        return [n for n in names if n in wanted]

    def _load(self, entries: list[TensorEntry]) -> None:
        """Load ``entries`` (and the targets of aliases among them) into ``self._tensors``."""
        t_start = time.perf_counter()
        data = {e.name: e for e in entries if e.alias is None}
        for e in entries:
            if e.alias is not None and e.alias not in self._tensors:
                data.setdefault(e.alias, self.index.tensors[e.alias])
        todo = [e for e in data.values() if e.name not in self._tensors]
        metrics = LoadMetrics(threads=self.num_readers)
        metrics.strategy = self._pick_strategy(todo, metrics)
        if metrics.strategy == "mmap":  # tracks its own slow part: a warm file's load starts no progress thread
            loaded = self._load_mmap(todo, metrics)
        else:
            loaded = progress.tracked(
                self._source, sum(e.length for e in todo), lambda: self._load_streamed(todo, metrics)
            )
        loaded = {n: self._finish(self.index.tensors[n], t) for n, t in loaded.items()}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._tensors.update(loaded)
        for e in entries:
            if e.alias is not None:
                self._tensors[e.name] = self._tensors[e.alias]
        metrics.bytes = sum(e.length for e in todo)
        metrics.tensors = len(todo)
        metrics.seconds = time.perf_counter() - t_start
        metrics.transfer = dict(getattr(self._source, "tuning", None) or {})  # remote: what ran, and why
        self._merge_metrics(metrics)

    def _merge_metrics(self, m: LoadMetrics) -> None:
        if not self.metrics.bytes and not self.metrics.tensors:
            self.metrics = m
            return
        for name in ("bytes", "tensors", "seconds", "chunks", "bytes_read", "exchange_seconds"):
            setattr(self.metrics, name, getattr(self.metrics, name) + getattr(m, name))
        self.metrics.stages.add(m.stages)
        self.metrics.transfer = m.transfer or self.metrics.transfer

    def _finish(self, entry: TensorEntry, t: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and is_floating(entry.dtype) and entry.dtype != self.dtype:
            return t.to(self.dtype)
        return t

    def _pick_strategy(self, todo: list[TensorEntry], metrics: LoadMetrics) -> str:
        """The strategy of this load: cheap checks of the request and the index, no scan of the data."""
        fd = self._source.fileno()
        if self.mmap:
            return "mmap"
        if self.distributed and self.strategy == "auto":
            return "pread"  # every rank must plan the same chunks, whatever its page cache holds
        if self.strategy != "auto":
            if self.strategy in ("odirect", "register") and fd is None:
                raise UsageError(f"strategy {self.strategy!r} needs a local file")
            if self.strategy == "register" and (self.device.type != "cuda" or self.transform is not None):
                raise UsageError("strategy 'register' needs a CUDA device and an unencrypted file")
            return self.strategy
        if self.device.type == "cpu":
            # zero-copy needs the file's own bytes as the tensors: local, not decrypted, not cast. Warm or cold:
            # a cold file is read through the page cache and mapped, which writes no fresh memory and copies
            # nothing (2-core VM, 0.92 GB cold, three bench runs: 1.97-2.13 GB/s against 1.59-1.64 for parallel
            # reads into new tensors and 1.79-1.94 for the fastest peer; docs/benchmarks.md)
            cast = self.dtype is not None and any(is_floating(e.dtype) and e.dtype != self.dtype for e in todo)
            return "pread" if fd is None or self.transform is not None or cast else "mmap"
        if fd is None:
            return "pread"
        metrics.resident = pagecache.resident_fraction(fd, self._source.size)
        return "pread" if metrics.resident is None or metrics.resident >= 0.5 else "odirect"

    def _load_streamed(self, todo: list[TensorEntry], metrics: LoadMetrics) -> dict[str, torch.Tensor]:
        from .plan import plan_chunks, plan_windows
        from .staging import PAGE, StagingPool, pool_shape

        strategy = metrics.strategy
        unit = self.index.block_size if (self.verify_hash or self.transform is not None) else self.chunk_bytes
        if self.distributed and unit == self.chunk_bytes:  # enough chunks for every rank to get a share
            from .distributed import split_unit

            unit = split_unit(todo, unit, self.process_group)
        if strategy == "odirect" and unit == self.chunk_bytes and unit > 4 * PAGE:
            unit -= 2 * PAGE  # widening a chunk to page boundaries then still fits a chunk_bytes buffer
        # pinning pages in place needs disjoint page-aligned windows; everything else splits per tensor
        chunks = plan_windows(todo, self.chunk_bytes) if strategy == "register" else plan_chunks(todo, unit)
        metrics.chunks = len(chunks)
        # no bytes but elements: upstream meta tensors, which load as zeros
        if self.device.type == "cuda":
            _reserve_device_memory(todo, self.device)
        dests = {e.name: _new_tensor(e, self.device) for e in todo}
        if not chunks:
            return dests
        verifier = Verifier(self.index) if self.verify_hash else None
        threads = self.num_readers
        if self.device.type == "cpu" and strategy == "pread":
            self._run(chunks, dests, metrics, lambda part: load_cpu(
                self._source, part, dests, threads=threads, verifier=verifier, transform=self.transform))  # fmt: skip
            return dests
        if strategy == "register":
            fd = self._source.fileno()
            assert fd is not None
            metrics.stages = load_registered(fd, self._source.size, chunks, dests, threads=threads)
            return dests
        direct_fd = None
        if strategy == "odirect":
            direct_fd = self._source.direct_fileno()
            if direct_fd is None:
                metrics.strategy = "pread"
        longest = max(c.length for c in chunks) + (2 * PAGE if direct_fd is not None else 0)
        buffer_bytes, max_buffers = pool_shape(longest, threads, self.staging_bytes, len(chunks))
        pool = StagingPool(buffer_bytes, max_buffers, pin=self.device.type == "cuda",
                           allocation=self.staging_allocation)  # fmt: skip
        try:
            self._run(chunks, dests, metrics, lambda part: load_staged(
                self._source, part, dests, threads=threads, pool=pool, verifier=verifier, transform=self.transform,
                direct_fd=direct_fd, file_size=self._source.size))  # fmt: skip
            metrics.staging_peak_bytes = pool.peak_allocated * buffer_bytes
        finally:
            pool.close()
        return dests

    def _run(self, chunks: list[Chunk], dests: dict[str, torch.Tensor], metrics: LoadMetrics,
             read: Callable[[list[Chunk]], StageTimes]) -> None:  # fmt: skip
        """Read ``chunks`` into ``dests`` with ``read``, or, replicated, this rank's share and exchange the rest."""
        if not self.distributed:
            with self._source.deferred_checks():  # tensors leave after this: checks may run once (not replicated)
                metrics.stages = read(chunks)
            metrics.bytes_read = sum(c.length for c in chunks)
            return
        from .distributed import load_replicated

        metrics.stages, metrics.bytes_read, metrics.exchange_seconds = load_replicated(
            chunks, dests, read, self.process_group
        )

    def _load_mmap(self, todo: list[TensorEntry], metrics: LoadMetrics) -> dict[str, torch.Tensor]:
        """Views of one private mapping of the file (copies for unaligned tensors), pages read and mapped now."""
        fd = self._source.fileno()
        if fd is None or fd < 0:
            raise UsageError("the deserializer is closed")
        if self._mapping is None:
            self._mapping = FileMapping(fd, self._source.size)
        mapping = self._mapping
        mapping.check(fd)  # a file that shrank since it was opened: a typed error, not SIGBUS below
        metrics.resident = pagecache.resident_fraction(fd, self._source.size)
        cold = metrics.resident is not None and metrics.resident < 0.5
        metrics.bytes_read = sum(e.length for e in todo)

        def slow_part() -> None:  # reads that may take seconds: under a progress bar (see engine.progress)
            if cold:  # every reader, not one per core: they wait on the disk, and more requests in flight help
                metrics.stages.read = mapping.read_through(fd, todo, self.num_readers, READ_THROUGH_PIECE_BYTES)
            if self.verify_hash:  # reading every block to check it also faults the pages in
                mapping.check_digests(self.index, todo, self.num_readers)

        if cold or self.verify_hash:
            progress.tracked(self._source, metrics.bytes_read, slow_part)
        # a warm file is left to be mapped by first access: a large folio per fault (mapping.py says why)
        return {e.name: _new_tensor(e, torch.device("cpu")) if e.length == 0 else mapping.tensor(e) for e in todo}

    # ---- modules ---------------------------------------------------------------------------------

    def load_into_module(self, module: torch.nn.Module, *, strict: bool = True) -> LoadInfo:
        """Fill ``module``'s parameters and buffers from this file, in place; nothing is left on meta.

        Works on modules created on the meta device: parameters become ``Parameter``s holding the loaded
        tensors (``requires_grad`` kept, tied weights stay tied), buffers keep their persistence, and
        non-persistent buffers the file lacks are rebuilt by the model's own init hook (transformers models)
        or refused. See :func:`hf_tensorizer.engine.modules.fill_module`.

        Args:
            module: the module to fill.
            strict: raise if keys are missing or unexpected, or a tensor is left on meta.

        Returns:
            The missing and unexpected keys.

        Raises:
            UsageError: with ``strict``, when the keys do not match; a shape mismatch; a non-persistent buffer
                on meta that cannot be rebuilt (always).
        """
        from .modules import fill_module

        return fill_module(self, module, device=self.device, strict=strict)

    # ---- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the source and the file mapping. Tensors already taken stay valid (mapped views keep the map);
        the deserializer itself then refuses everything (``ClosedError``), its keys included."""
        self._closed = True
        if getattr(self, "_owns_source", False) and hasattr(self, "_source"):
            self._source.close()
        self._mapping = None

    def __enter__(self) -> TensorDeserializer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorDeserializer({self._source.uri!r}, tensors={len(self._names)}, device={self.device})"


def _new_tensor(entry: TensorEntry, device: torch.device) -> torch.Tensor:
    """The destination of one entry: uninitialised, or zeros for entries with elements but no bytes
    (upstream meta tensors). Empty tensors use ``torch.empty``: fp4 has no fill kernel."""
    if entry.length == 0 and entry.numel:
        return torch.zeros(entry.shape, dtype=entry.dtype, device=device)
    return torch.empty(entry.shape, dtype=entry.dtype, device=device)


def _reserve_device_memory(entries: list[TensorEntry], device: torch.device) -> None:
    """Grow torch's CUDA caching allocator by one segment that the large tensors are then carved from.

    One cudaMalloc instead of one per tensor (each maps fresh device pages while holding the driver lock,
    stalling the reader threads' copies). The tensors stay separate allocations that own their memory.
    Skipped when the one segment does not fit; the per-tensor allocations may still.
    """
    total = sum(-(-e.length // 512) * 512 for e in entries if e.length > (1 << 20))
    if total < (64 << 20):
        return
    try:
        torch.empty(total, dtype=torch.uint8, device=device)
    except torch.cuda.OutOfMemoryError:
        pass


def _check_arguments(strategy: str, dtype: torch.dtype | None, num_readers: int | None, chunk_bytes: int | None,
                     staging_bytes: int | None, staging_allocation: str | None) -> None:  # fmt: skip
    if strategy not in STRATEGIES:
        raise UsageError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not is_floating(dtype)):
        raise UsageError(f"dtype= casts floating tensors and must be a floating torch.dtype, got {dtype!r}")
    for name, value in (("num_readers", num_readers), ("chunk_bytes", chunk_bytes), ("staging_bytes", staging_bytes)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if staging_allocation is not None:
        from .staging import ALLOCATIONS  # only when one is named: a CPU load never imports the staging pool

        if staging_allocation not in ALLOCATIONS:
            raise UsageError(f"staging_allocation must be one of {ALLOCATIONS}, got {staging_allocation!r}")


def load_state_dict(source: str | os.PathLike[str] | Source, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Load every tensor of ``source`` into a plain dict (``TensorDeserializer`` arguments apply)."""
    with TensorDeserializer(source, **kwargs) as d:
        return dict(d)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], dest: str | os.PathLike[str], **kwargs: Any) -> FileIndex:
    """Write ``state_dict`` to ``dest`` (``TensorSerializer`` arguments apply). Returns the index."""
    from .writer import TensorSerializer

    s = TensorSerializer(dest, **kwargs)
    s.write_state_dict(state_dict)
    return s.close()


def __getattr__(name: str) -> Any:  # LoadInfo: defined in engine.modules, imported on first use
    if name == "LoadInfo":
        return importlib.import_module(".modules", __package__).LoadInfo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LoadInfo", "TensorDeserializer", "TensorizerError", "load_state_dict", "save_state_dict"]
