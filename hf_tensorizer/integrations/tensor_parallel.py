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

from collections.abc import Mapping
from typing import Any

from ..constants import SLICE_MAX_GAP
from ..engine.decrypt import choose_transform
from ..engine.pipeline import Verifier
from ..engine.slices import SliceMetrics, TensorSlice
from ..errors import UsageError
from .weights import OpenWeights


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
            index, uri = self.weights.indexes[i], self.weights.sources[i].uri
            transform = choose_transform(index, self.engine.get("encryption"), self.engine.get("transform"), uri)
            verify = bool(self.engine.get("verify_hash"))
            if verify and index.digest == "none" and transform is None:
                raise UsageError(f"{uri} has no digests to verify")
            self._per_file[i] = (transform, Verifier(index) if verify else None)
        return self._per_file[i]

    def slice(self, name: str) -> TensorSlice:
        """A lazy, sliceable view of tensor ``name``."""
        i = self.weights.file_of[name]
        transform, verifier = self._file(i)
        threads = self.engine.get("num_readers") or 4
        return TensorSlice(self.weights.sources[i], self.weights.indexes[i], name, self.metrics, threads=threads,
                           max_gap=SLICE_MAX_GAP, transform=transform, verifier=verifier)  # fmt: skip


def split_sharded(weights: OpenWeights, engine: Mapping[str, Any], meta_sd: Mapping[str, Any],
                  renamed: Mapping[str, str]) -> tuple[dict[str, TensorSlice], SliceMetrics | None]:  # fmt: skip
    """The tensors of a load that transformers will shard, as lazy slices.

    Args:
        weights: the open weight files.
        engine: ``TensorDeserializer`` options of the load.
        meta_sd: the meta model's state dict (DTensors where the TP plan applies).
        renamed: checkpoint key -> model key, for the keys the load reads.

    Returns:
        ``(checkpoint key -> TensorSlice, metrics)``; empty and ``None`` when nothing is sharded (no TP).
    """
    keys = [k for k, model_key in renamed.items() if is_sharded(meta_sd.get(model_key))]
    if not keys:
        return {}, None
    reader = ShardReader(weights, engine)
    reader.metrics.whole = sum(weights.entry(k).length for k in keys)
    return {k: reader.slice(k) for k in keys}, reader.metrics
