"""``--load-format hf_tensorizer``: vLLM's model loader for tensorized artifacts (and safetensors behind a URI).

vLLM builds the model (its own parameter layout: fused QKV, gate/up, vocabulary shards) and calls
:meth:`HfTensorizerLoader.load_weights`, which hands ``model.load_weights`` an iterator of ``(name, tensor)``: the
model's own weight loaders rename, fuse and shard them. With one tensor-parallel rank, the tensors stream through
:class:`~hf_tensorizer.TensorDeserializer` in batches of about ``BATCH_BYTES`` (a local file is mapped, zero copy;
a remote or encrypted one is read on many threads), so memory beyond the model stays bounded; on CPU a whole
parameter becomes its streamed tensor instead of a copy of it (:mod:`.adopt`). With several ranks
each tensor is a :class:`~.lazy.LazyTensor`: the weight loader's ``narrow`` picks this rank's box before a byte is
read, and each rank reads only its shards.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ....constants import KEY_ENV, SLICE_MAX_GAP
from ....engine import TensorDeserializer
from ....engine.lease import FileLease
from ....engine.pipeline import Verifier
from ....engine.slices import SliceMetrics, TensorSlice
from ....engine.staging import reuse_blocks
from ....errors import FormatError, LeaseUnavailableError, MissingKeyError, UsageError
from ....sources.uri import redact
from ...loading.weights import OpenWeights, locate, open_weights, slice_checks
from .adopt import Adoption
from .lazy import LazyTensor
from .options import FLAG, LOGGER, LoaderOptions, parse_extra_config

BATCH_BYTES = 1 << 30  # tensors per deserializer: bounds the copies held at once (remote/encrypted/cast loads)


def vllm_logger() -> Any:
    """A logger under vLLM's own (its handler and format)."""
    from vllm.logger import init_logger

    return init_logger(LOGGER)


def _key_advice() -> str:
    return f'give {FLAG} \'{{"key_file": PATH}}\' (or "passphrase_env": VAR) or set {KEY_ENV}'


def batches(weights: OpenWeights, limit: int = BATCH_BYTES) -> Iterator[tuple[int, list[str]]]:
    """``(file, tensor names)`` groups in file order, each at most ``limit`` bytes (one tensor may exceed it)."""
    for i, index in enumerate(weights.indexes):
        group: list[str] = []
        size = 0
        for name, entry in index.tensors.items():
            n = 0 if entry.alias is not None else entry.length
            if group and size + n > limit:
                yield i, group
                group, size = [], 0
            group.append(name)
            size += n
        if group:
            yield i, group


def streamed(weights: OpenWeights, engine: Mapping[str, Any], device: torch.device, stats: dict[str, Any],
             opened: list[TensorDeserializer] | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Every tensor of the open files, streamed onto ``device`` one batch at a time; ``opened`` (if given) holds
    the deserializer of the batch being streamed (an :class:`~.adopt.Adoption` takes mapped tensors from it).

    Raises:
        MissingKeyError: an encrypted file and no key (the message says how to give one to vLLM).
        DecryptionError / HashMismatchError / SourceError / FormatError: as the engine raises them.
    """
    with reuse_blocks():  # one pinned staging block for every batch (GPU loads)
        for i, names in batches(weights):
            try:
                d = TensorDeserializer(weights.sources[i], device=device, filter=names, index=weights.indexes[i],
                                       **engine)  # fmt: skip
            except MissingKeyError as exc:
                raise exc.advise(_key_advice()) from None
            with d:
                stats["bytes"] += d.metrics.bytes
                stats["read"] += d.metrics.bytes_read
                stats["strategy"] = d.metrics.strategy
                if opened is not None:
                    opened[:] = [d]
                try:
                    yield from d.items()
                finally:
                    if opened is not None:
                        opened.clear()


def file_checks(weights: OpenWeights, engine: Mapping[str, Any]) -> dict[int, tuple[Any, Verifier | None]]:
    """Per weight file, its decrypting transform (the header authenticated with the key) and verifier.

    Raises:
        MissingKeyError: an encrypted file and no key (the message says how to give one to vLLM).
        DecryptionError: a wrong key, a tampered header, or a key for a plain file.
        UsageError: ``verify_hash`` on a file without digests.
    """
    out: dict[int, tuple[Any, Verifier | None]] = {}
    for i, index in enumerate(weights.indexes):
        try:
            out[i] = slice_checks(index, weights.sources[i].uri, engine)
        except MissingKeyError as exc:
            raise exc.advise(_key_advice()) from None
    return out


def preflight(root: str, options: LoaderOptions) -> None:
    """What can be checked before vLLM starts its engine, in one small read per weight file: the artifact and its
    weights exist, their indexes parse, an encrypted file's header authenticates with the key given.

    Raises:
        UsageError / SourceError / ObjectChangedError / FormatError / MissingKeyError / DecryptionError: the load
            would fail; vLLM's front-end stops with this error instead of starting workers.
    """
    _, uris = locate(root, **options.transport)
    with open_weights(uris, **options.transport) as weights:
        file_checks(weights, options.engine)


def sliced(weights: OpenWeights, engine: Mapping[str, Any], metrics: SliceMetrics) -> Iterator[tuple[str, LazyTensor]]:
    """Every tensor of the open files as a :class:`~.lazy.LazyTensor`: only the boxes the weight loaders keep
    are read (decrypted and verified by whole blocks, as a full load does).

    Raises:
        MissingKeyError / UsageError: as for a whole load (no key; ``verify_hash`` on a file without digests).
    """
    per_file = file_checks(weights, engine)
    threads = engine.get("num_readers") or 4
    for name, i in weights.file_of.items():
        transform, verifier = per_file[i]
        metrics.whole += weights.entry(name).length
        yield name, LazyTensor(TensorSlice(weights.sources[i], weights.indexes[i], name, metrics, threads=threads,
                                           max_gap=SLICE_MAX_GAP, transform=transform, verifier=verifier))  # fmt: skip


def weights_root(model_config: Any) -> str:
    """Where the weights of vLLM's model come from: the original URI when the model's small files were fetched
    into a local folder (``model_weights``), else the model path itself (a local folder, or a cached one whose
    marker names the remote weights)."""
    return model_config.model_weights or model_config.model


def _tp_world() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except Exception:  # no model-parallel group (a load outside vLLM's workers)
        return 1


def _world() -> tuple[int, int]:
    """(rank, size) of the default process group: every replica of a ``distributed`` load ((0, 1) without one)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _loader_base() -> type:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    return BaseModelLoader


class HfTensorizerLoaderMixin:
    """The loader's behaviour; :func:`loader_class` joins it with vLLM's ``BaseModelLoader`` (imported only in a
    process that runs vLLM, so this module imports without vLLM)."""

    load_config: Any
    # inside load_model: released after vLLM's post-processing (with whether a read lease guards their file)
    _adoptions: list[tuple[Adoption, bool]] | None = None

    def _options(self) -> LoaderOptions:
        return parse_extra_config(self.load_config.model_loader_extra_config)

    def download_model(self, model_config: Any) -> None:
        """Fetch the artifact's small files (configs, tokenizer) into the local cache; the weights stay where
        they are and stream at load time.

        Raises:
            SourceError / FormatError / UsageError: the artifact cannot be read or has no weights.
        """
        locate(weights_root(model_config), **self._options().transport)

    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        """Stream the artifact's weights into vLLM's ``model`` (see the module doc).

        Raises:
            UsageError: bad extra config, or an artifact without weights.
            MissingKeyError / DecryptionError: encrypted artifact without the right key.
            SourceError / ObjectChangedError: the weights cannot be read, or changed since the manifest.
            FormatError / HashMismatchError: a corrupt or incomplete artifact.
        """
        log = vllm_logger()
        opts = self._options()
        root = weights_root(model_config)
        t0 = time.perf_counter()
        _, uris = locate(root, **opts.transport)
        tp = _tp_world()
        if tp > 1 and opts.engine.get("distributed"):
            raise UsageError(f"{FLAG}: distributed=true shares whole tensors between replicas; with "
                             f"tensor_parallel_size={tp} every rank reads its own shards instead")  # fmt: skip
        if opts.engine.get("distributed") and tp == 1 and _world()[1] == 1:
            # vLLM runs the data-parallel ranks of a dense model as independent engines, each in a world of one
            # (vllm/v1/engine/core.py, reconfigure_for_independent_dp_rank): no group spans the replicas
            log.warning(
                "hf_tensorizer: distributed=true but this worker's process group has one rank (vLLM "
                "runs data-parallel replicas of a dense model as independent engines): it reads every byte"
            )
        with open_weights(uris, **opts.transport) as weights:
            total = sum(weights.entry(n).length for n in weights.file_of if weights.entry(n).alias is None)
            log.info("hf_tensorizer: loading %d tensors (%.2f GB) from %s", len(weights.file_of), total / 1e9,
                     redact(root))  # fmt: skip
            device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
            stats: dict[str, Any] = {"bytes": 0, "read": 0, "strategy": "slices"}
            metrics = SliceMetrics()
            adoption = None
            leases: list[FileLease] = []
            if tp > 1:
                tensors: Iterator[tuple[str, torch.Tensor]] = sliced(weights, opts.engine, metrics)
            elif opts.adopt and device.type == "cpu":
                if opts.lease:  # before any byte is mapped: the bytes loaded are the bytes the lease keeps
                    leases = _take_leases(uris)
                opened: list[TensorDeserializer] = []
                adoption = Adoption(model, functools.partial(_take, opened, stats))
                tensors = adoption.offer(streamed(weights, opts.engine, device, stats, opened))
            else:
                tensors = streamed(weights, opts.engine, device, stats)
            with adoption or contextlib.nullcontext():
                loaded = model.load_weights(tensors)
        seconds = time.perf_counter() - t0
        read = metrics.bytes if tp > 1 else stats["bytes"]
        log.info("Loading weights took %.2f seconds (%.2f GB, %.2f GB/s, hf_tensorizer %s)", seconds, read / 1e9,
                 read / 1e9 / max(seconds, 1e-9), stats["strategy"])  # fmt: skip
        if tp > 1:
            log.info("hf_tensorizer: this rank read %d of %d bytes (%d requests, %.1f%% over-read)", metrics.bytes,
                     metrics.whole, metrics.requests, 100 * metrics.overread)  # fmt: skip
        elif opts.engine.get("distributed"):
            log.info("hf_tensorizer: this replica read %d of %d bytes (rank %d of %d; the others sent the rest)",
                     stats["read"], stats["bytes"], *_world())  # fmt: skip
        if adoption is not None:
            log.info("hf_tensorizer: %d parameters are their streamed tensors (%.2f GB not copied), %d copies made "
                     "(fused or partial parameters)", len(adoption.stats.taken), adoption.stats.taken_bytes / 1e9,
                     adoption.stats.copied)  # fmt: skip
            _HELD.extend(leases)  # for the life of the process: the kept parameters map the files
            if self._adoptions is None:  # not inside load_model (vLLM reloading weights): nothing to wait for
                _release(adoption, leased=bool(leases))
            else:
                self._adoptions.append((adoption, bool(leases)))
        if loaded is not None and model_config.quantization is None:
            _check_complete(model, set(loaded), root)

    def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> torch.nn.Module:
        """vLLM's ``load_model`` (build, :meth:`load_weights`, post-process; for an unquantized model on CPU
        :meth:`_build_and_load`), then the parameters still on the artifact's file mapping stay there under a read
        lease or are copied out of it (:meth:`.adopt.Adoption.release`)."""
        self._adoptions = []
        try:
            if _plain_cpu_load(vllm_config):
                model = self._build_and_load(vllm_config, model_config, prefix)
            else:
                model = super().load_model(vllm_config, model_config, prefix)  # type: ignore[misc]
            for adoption, leased in self._adoptions:
                _release(adoption, leased)
        finally:
            self._adoptions = None
        return model

    def _build_and_load(self, vllm_config: Any, model_config: Any, prefix: str) -> torch.nn.Module:
        """``BaseModelLoader.load_model``'s steps for an unquantized model on CPU — build the model under its dtype
        and device, :meth:`load_weights`, vLLM's ``process_weights_after_loading`` — without two costs such a load
        does not need (measured with cProfile in a vLLM 0.32 CPU worker, 1.07 GB Llama):

        * two full ``gc.collect()`` passes, 0.25–0.29 s each in a process holding vLLM's millions of objects. They
          hand memory held by garbage cycles back before post-processing (CUDA's caching allocator); this loader
          leaves no cycles — its deserializers, mappings and buffers go by reference counting
          (tests/test_vllm_adopt.py) — and a CPU has no caching allocator;
        * the import of vLLM's online-quantization module (and ``compressed_tensors``, ~0.1 s), made only to find
          that a model without a quantization config has no online quantization.

        vLLM's own tensorizer loader builds and loads its models the same way (and skips the post-processing).
        """
        from vllm.model_executor.model_loader.base_loader import log_model_inspection
        from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
        from vllm.utils.torch_utils import set_default_torch_dtype

        target = _load_device(vllm_config)
        with set_default_torch_dtype(model_config.dtype), target:
            t0 = time.perf_counter()
            model = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            log_model_inspection(model)
            vllm_logger().info("Initializing model took %.6f seconds", time.perf_counter() - t0)
            self.load_weights(model, model_config)
            process_weights_after_loading(model, model_config, target)
        return model.eval()


def _load_device(vllm_config: Any) -> torch.device:
    return torch.device(vllm_config.load_config.device or vllm_config.device_config.device)


def _plain_cpu_load(vllm_config: Any) -> bool:
    """An unquantized model (no quantization config: no online quantization either) loaded on CPU."""
    return vllm_config.quant_config is None and _load_device(vllm_config).type == "cpu"


def _take(opened: list[TensorDeserializer], stats: dict[str, Any], t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """An :class:`~.adopt.Adoption`'s ``take``: a mapped tensor on a mapping of its own pages; a tensor read into
    memory of its own as it is; a mapped tensor of a batch already closed (it can no longer be re-mapped): copied."""
    for d in opened:
        own = d.own_pages(t)
        if own is not None:
            return own, True
    return None if stats["strategy"] == "mmap" else (t, False)


_HELD: list[FileLease] = []  # the read leases of the files that kept parameters still map


def _take_leases(uris: Sequence[str]) -> list[FileLease]:
    """Read leases on the local weight files among ``uris`` (all of them), or none: then the kept parameters are
    copied out after post-processing, as without leases."""
    paths = [u.removeprefix("file://") for u in uris if "://" not in u or u.startswith("file://")]
    if not paths or len(paths) != len(uris):
        return []
    leases: list[FileLease] = []
    try:
        for path in paths:
            leases.append(FileLease.take(path))
    except (LeaseUnavailableError, OSError) as exc:
        vllm_logger().info("hf_tensorizer: no read lease (%s): parameters kept after post-processing will be "
                           "copied out of the file mapping", exc)  # fmt: skip
        for lease in leases:
            lease.close()
        return []
    return leases


def _release(adoption: Adoption, leased: bool = False) -> None:
    t0 = time.perf_counter()
    stats = adoption.release(copy=not leased)
    if stats.kept:
        vllm_logger().info("hf_tensorizer: %d parameters kept after post-processing stay on the file mapping "
                           "(%.2f GB) under a read lease: a process opening the file for writing waits while they "
                           "move into private memory", len(stats.kept), stats.kept_bytes / 1e9)  # fmt: skip
    if stats.released:
        vllm_logger().info("hf_tensorizer: %d parameters kept after post-processing were copied out of the file "
                           "mapping (%.2f GB in %.2f s)", len(stats.released), stats.released_bytes / 1e9,
                           time.perf_counter() - t0)  # fmt: skip


def _check_complete(model: torch.nn.Module, loaded: set[str], root: str) -> None:
    """Every parameter of an unquantized model came from the artifact: vLLM's default loader's own check
    (``track_weights_loading``, which knows the parameters a checkpoint need not hold).

    Raises:
        FormatError: parameters the artifact did not provide.
    """
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    try:
        DefaultModelLoader.track_weights_loading(None, model, loaded)  # type: ignore[arg-type]  # uses no state
    except ValueError as exc:
        raise FormatError(f"{redact(root)} does not hold every weight of the model vLLM built: {exc}") from None


def loader_class() -> type:
    """The ``BaseModelLoader`` subclass vLLM instantiates for ``--load-format hf_tensorizer``."""
    base = _loader_base()

    class HfTensorizerLoader(HfTensorizerLoaderMixin, base):  # type: ignore[valid-type,misc]
        """vLLM model loader of tensorized artifacts (``--load-format hf_tensorizer``)."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self._options()  # a bad extra config fails here, before the model is built

    HfTensorizerLoader.__module__, HfTensorizerLoader.__qualname__ = __name__, "HfTensorizerLoader"
    return HfTensorizerLoader
