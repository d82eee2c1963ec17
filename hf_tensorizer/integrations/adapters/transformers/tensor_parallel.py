"""Tensor-parallel loads: each rank reads only the bytes of its own shards.

transformers' TP loader (``from_pretrained(..., tp_plan=...)``) computes each rank's intervals of a parameter from
its DTensor placements and indexes the state-dict value with slices (``value[tuple(slices)]``, or one slice per
interval then ``torch.cat`` for fused/strided layouts); a value that is not a tensor is asked ``get_shape()``
first, like safetensors' slice objects. For every tensor whose parameter the plan shards we hand it a
:class:`~hf_tensorizer.engine.slices.TensorSlice` over the open, pinned source, so every TP style (colwise,
rowwise, packed, experts) reads only its shard with no TP-specific code here. Replicated tensors are read whole
through the normal engine path. Per-rank bytes are counted in a :class:`~hf_tensorizer.engine.slices.SliceMetrics`
appended to ``model.hf_tensorizer_metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from ....constants import SLICE_MAX_GAP
from ....engine.distributed import gather_rows, handshake, identity_of_files
from ....engine.pipeline import Verifier
from ....engine.rankwatch import watch_for
from ....engine.slices import Ranges, SliceMetrics, TensorSlice, normalize_box
from ...loading.weights import OpenWeights, slice_checks


def is_sharded(param: Any) -> bool:
    """Whether transformers will cut ``param`` (a parameter of the meta model) per rank: a DTensor with at least
    one ``Shard``-like placement. Replicated DTensors and plain tensors are read whole."""
    placements = getattr(param, "placements", None)
    return placements is not None and any(hasattr(p, "dim") for p in placements)


class ShardReader:
    """The slice readers of one load: one decrypting transform and verifier per weight file, one metrics object.

    Args:
        weights: the open weight files.
        engine: the load's ``TensorDeserializer`` options (``encryption``, ``verify_hash``, ``num_readers``,
            ``transform`` apply; the others concern whole-tensor loads).

    Raises:
        UsageError: ``verify_hash`` on a file without digests.
        MissingKeyError / DecryptionError: as for a whole load of an encrypted file.
    """

    def __init__(self, weights: OpenWeights, engine: Mapping[str, Any]) -> None:
        self.weights = weights
        self.engine = engine
        self.metrics = SliceMetrics()
        self._per_file: dict[int, tuple[Any, Verifier | None]] = {}

    def _file(self, i: int) -> tuple[Any, Verifier | None]:
        if i not in self._per_file:
            self._per_file[i] = slice_checks(self.weights.indexes[i], self.weights.sources[i].uri, self.engine)
        return self._per_file[i]

    def slice(self, name: str) -> TensorSlice:
        """A lazy, sliceable view of tensor ``name``."""
        i = self.weights.file_of[name]
        transform, verifier = self._file(i)
        threads = self.engine.get("num_readers") or 4
        return TensorSlice(self.weights.sources[i], self.weights.indexes[i], name, self.metrics, threads=threads,
                           max_gap=SLICE_MAX_GAP, transform=transform, verifier=verifier)  # fmt: skip


def split_sharded(weights: OpenWeights, engine: Mapping[str, Any], meta_sd: Mapping[str, Any],
                  renamed: Mapping[str, str]) -> tuple[dict[str, Any], SliceMetrics | None]:  # fmt: skip
    """The tensors of a load that transformers will shard, as lazy slices.

    Args:
        weights: the open weight files.
        engine: ``TensorDeserializer`` options of the load.
        meta_sd: the meta model's state dict (DTensors where the TP plan applies).
        renamed: checkpoint key -> model key, for the keys the load reads.

    Returns:
        ``(checkpoint key -> TensorSlice or PrefetchedSlice, metrics)``; empty and ``None`` when nothing is
        sharded (no TP). Under torch.distributed every rank calls it: the ranks first agree that they opened the
        same weights (``engine.distributed.handshake``; a rank that failed to open its slices fails them all), then
        gather the row-cut tensors, each gather a collective.

    Raises:
        DistributedError: the ranks opened different weights, or another rank failed, exited or hung.
    """
    keys = [k for k, model_key in renamed.items() if is_sharded(meta_sd.get(model_key))]
    if not keys:
        return {}, None
    watch = watch_for(None) if _world() > 1 else None
    try:
        reader = ShardReader(weights, engine)
        reader.metrics.whole = sum(weights.entry(k).length for k in keys)
        slices: dict[str, Any] = {k: reader.slice(k) for k in keys}
        if watch is None:
            return slices, reader.metrics
        plan = {"keys": keys, "verify_hash": bool(engine.get("verify_hash")), "encrypted": any(
            reader._file(i)[0] is not None for i in {weights.file_of[k] for k in keys})}  # fmt: skip
        handshake(watch, identity_of_files(weights.sources, weights.indexes, **plan))
        for k in keys:  # the same keys in the same order on every rank: each gather is a collective
            param = meta_sd[renamed[k]]
            if _cuts_rows(param, slices[k]):
                slices[k] = _prefetch(param, slices[k], reader.metrics)
    except BaseException as exc:
        if watch is not None:  # the peers may be waiting for this rank: they hear of it now
            watch.fail(exc)
        raise
    return slices, reader.metrics


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _cuts_rows(param: Any, s: TensorSlice) -> bool:
    """Whether the plan cuts ``param`` along a dimension other than 0 (segments per row), for a tensor stored with
    the parameter's own shape (converted tensors, e.g. per-expert weights fused on load, stay lazy slices). The
    answer depends on the placements only, never on the rank: every rank makes the same collectives."""
    if list(param.shape) != list(s.entry.shape) or len(s.entry.shape) < 2:
        return False
    ndim = len(s.entry.shape)
    return any(hasattr(p, "dim") and p.dim % ndim != 0 for p in param.placements)


class _Recorder:
    """Stands in for the tensor while transformers' sharding op computes this rank's boxes."""

    def __init__(self, shape: list[int], dtype: torch.dtype) -> None:
        self.shape, self.dtype, self.keys = shape, dtype, []  # type: ignore[var-annotated]

    def get_shape(self) -> list[int]:
        return self.shape

    def __getitem__(self, key: Any) -> torch.Tensor:
        box = normalize_box(self.shape, key)
        if box is None:
            raise TypeError(f"unexpected key {key!r}")
        self.keys.append(tuple(box[0]))
        return torch.empty([b - a for a, b in box[0]], dtype=self.dtype, device="meta")


def _boxes(param: Any, s: TensorSlice) -> list[tuple[tuple[int, int], ...]]:
    """The boxes transformers will index for this rank, or [] when they cannot be learnt (then it reads them)."""
    try:
        from transformers.distributed.sharding_utils import DtensorShardOperation

        rec = _Recorder(list(s.entry.shape), s.entry.dtype)
        DtensorShardOperation(param).shard_tensor(rec)
        return rec.keys
    except Exception:  # another transformers version: fall back to reading the boxes when asked
        return []


class PrefetchedSlice:
    """A :class:`TensorSlice` whose boxes for this rank were fetched cooperatively; other keys read the source."""

    def __init__(self, base: TensorSlice, boxes: dict[tuple[tuple[int, int], ...], torch.Tensor]) -> None:
        self.base, self.boxes = base, boxes
        self.shape, self.dtype = base.shape, base.dtype

    def get_shape(self) -> list[int]:
        return self.base.get_shape()

    def get_dtype(self) -> str:
        return self.base.get_dtype()

    def __getitem__(self, key: Any) -> torch.Tensor:
        box = normalize_box(self.base.get_shape(), key)
        if box is not None and not box[1]:
            t = self.boxes.pop(tuple(box[0]), None)  # each box is asked for once: free it as it goes
            if t is not None:
                return t
        return self.base[key]


def _prefetch(param: Any, s: TensorSlice, metrics: SliceMetrics) -> PrefetchedSlice:
    rest: Ranges = [(0, n) for n in s.entry.shape[1:]]
    boxes = _boxes(param, s)
    t0, read_s = time.perf_counter(), metrics.seconds
    full = gather_rows(lambda a, b: s.read([(a, b), *rest]), s.entry.shape, s.entry.dtype)
    kept = {box: full[tuple(slice(a, b) for a, b in box)].clone() for box in boxes}
    metrics.exchange_seconds += time.perf_counter() - t0 - (metrics.seconds - read_s)
    return PrefetchedSlice(s, kept)
