"""Replicated loads over torch.distributed: each rank reads ~1/N of the chunks, the ranks exchange the rest.

Every rank plans the same chunks (same file, filter and options), so ownership needs no messages: the chunk list
is cut into N contiguous spans of about equal bytes, and rank ``r`` reads span ``r`` from the source (decrypting
and verifying what it reads, as a single-process load does). Before any byte moves, the ranks
agree on what they opened (:func:`handshake`: size, index digest, version, plan) and on whether every rank opened it
at all; after the reads a status exchange tells every rank whether all reads succeeded (a failed rank's error
surfaces on every rank as :class:`DistributedError`), and each rank's bytes go to the others by ``broadcast`` from
their reader: pieces of 1 MiB and more straight from/into the destination tensors, smaller ones packed into one
bounded bucket per broadcast. Any backend works: gloo for host memory, NCCL for device memory (the destinations are
then device tensors). Status exchanges go through the group's store and every collective is polled with the peers
watched (``engine.rankwatch``): a peer that fails, exits or dies is noticed within seconds, whatever the process
group's ``timeout``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import DistributedError, UsageError
from ..format.index import TensorEntry
from .memory import as_bytes
from .pipeline import StageTimes
from .plan import Chunk, Piece
from .rankwatch import Watch, describe, watch_for

BUCKET_BYTES = 16 << 20  # small pieces are packed into buckets of this size: bounded extra memory, few collectives
DIRECT_BYTES = 1 << 20  # pieces at least this large are broadcast in place, without packing


def group_of(process_group: Any) -> tuple[Any, int, int]:
    """``(group, rank, world size)`` of ``process_group`` (``None``: the default group).

    Raises:
        UsageError: torch.distributed is not available or not initialised.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise UsageError("distributed=True needs an initialised torch.distributed process group (torchrun)")
    return process_group, dist.get_rank(process_group), dist.get_world_size(process_group)


def split_unit(entries: Sequence[TensorEntry], unit: int, process_group: Any = None) -> int:
    """The read unit of a replicated load: at most ``unit``, small enough for ~4 chunks per rank (a small file
    still spreads over the ranks), at least 64 KiB. The same on every rank (it depends on the plan only)."""
    world = group_of(process_group)[2]
    total = sum(e.length for e in entries if e.alias is None)
    return max(64 << 10, min(unit, total // (4 * world) // 4096 * 4096))


def owners(chunks: Sequence[Chunk], world: int) -> list[int]:
    """The rank that reads each chunk: contiguous spans of about ``total / world`` bytes each."""
    total = sum(c.length for c in chunks) or 1
    out, pos = [], 0
    for c in chunks:
        out.append(min(world - 1, (pos + c.length // 2) * world // total))
        pos += c.length
    return out


def begin_replicas(lazy: bool, mmap: bool, strategy: str, process_group: Any) -> Watch:
    """Check a replicated load's options and start watching its group, before anything that can fail on one rank.

    Raises:
        UsageError: ``lazy``, a mapping strategy, or no initialised process group.
    """
    if lazy:
        raise UsageError("distributed=True loads every tensor at once on every rank (lazy=False)")
    if mmap or strategy in ("mmap", "register"):
        raise UsageError("distributed=True reads into new tensors: strategy 'pread' or 'odirect'")
    group_of(process_group)
    return watch_for(process_group)


_VERSION_FIELDS = ("version_id", "etag", "version", "commit_hash", "last_modified")


def identity(source: Any, index: Any, **plan: Any) -> dict[str, Any]:
    """What one rank opened, as the ranks compare it: ``size``, ``index`` (a digest of every entry's name, dtype,
    shape, offset, length and block digests, the metadata and the digest settings), ``version`` (ETag, version id,
    commit: whatever the source pinned) and ``plan`` (the options the chunk plan derives from)."""
    entries = [[e.name, str(e.dtype), list(e.shape), e.offset, e.length, e.alias, list(e.digests)]
               for e in index.tensors.values()]  # fmt: skip
    doc = json.dumps([entries, sorted(index.metadata.items()), index.digest, index.block_size], default=str)
    version = {f: str(getattr(source, f)) for f in _VERSION_FIELDS if getattr(source, f, None) is not None}
    for k, v in plan.items():  # long values (the selected names) compare by digest
        plan[k] = v if isinstance(v, (bool, int, type(None))) else hashlib.sha256(str(v).encode()).hexdigest()[:12]
    return {"uri": source.uri, "size": source.size, "index": hashlib.sha256(doc.encode()).hexdigest()[:16],
            "version": version or None, "plan": plan}  # fmt: skip


def identity_of_files(sources: Sequence[Any], indexes: Sequence[Any], **plan: Any) -> dict[str, Any]:
    """:func:`identity` of a load of several weight files (a sharded checkpoint), in their order."""
    parts = [identity(s, i) for s, i in zip(sources, indexes, strict=True)]
    versions = [p["version"] for p in parts]
    return {**identity(sources[0], indexes[0], **plan), "uri": ", ".join(p["uri"] for p in parts),
            "size": [p["size"] for p in parts], "index": hashlib.sha256("".join(p["index"] for p in parts).encode()
            ).hexdigest()[:16], "version": versions if any(versions) else None}  # fmt: skip


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """How two ranks' :func:`identity` differ. Versions compare only for the same URI (node-local copies of one
    file have different ones); the index digest covers the block digests, so files with digests compare by value."""
    diff = [f for f in ("size", "index") if a[f] != b[f]]
    diff += [f"plan.{k}" for k in sorted(set(a["plan"]) | set(b["plan"])) if a["plan"].get(k) != b["plan"].get(k)]
    if a["uri"] == b["uri"] and a["version"] and b["version"] and a["version"] != b["version"]:
        diff.append("version")
    return diff


def handshake(watch: Watch, what: dict[str, Any]) -> None:
    """Every rank posts what it opened (:func:`identity`) and checks all ranks opened the same thing, before any
    collective that could wait: a rank that failed to open (missing file, wrong key) fails every rank now.

    Raises:
        DistributedError: a rank failed before the load, or the ranks disagree (the message names the difference).
    """
    statuses = watch.exchange({"error": None, "what": what})
    failed = [(r, s["error"]) for r, s in sorted(statuses.items()) if s.get("error")]
    if failed:
        raise DistributedError(f"rank {failed[0][0]} failed before the distributed load: {failed[0][1]}")
    first = min(statuses)
    ref = statuses[first]["what"]
    for r, s in sorted(statuses.items()):
        diff = differences(ref, s["what"])
        if diff:
            raise DistributedError(f"the ranks disagree on what they load ({', '.join(diff)} differ): rank {first} "
                                   f"opened {_show(ref)}, rank {r} opened {_show(s['what'])}")  # fmt: skip


def _show(w: dict[str, Any]) -> str:
    return f"{w['uri']} (size {w['size']}, index {w['index']}, version {w['version']})"


def load_replicated(
    chunks: Sequence[Chunk],
    dests: dict[str, torch.Tensor],
    read: Callable[[Sequence[Chunk]], StageTimes],
    process_group: Any = None,
) -> tuple[StageTimes, int, float]:
    """Fill ``dests`` on every rank: read this rank's share with ``read`` and exchange the rest.

    Args:
        chunks: the load's plan, identical on every rank.
        dests: destination tensors by entry name (host or device memory; the backend must support it).
        read: reads a list of chunks into ``dests`` (the single-process pipeline), returns its stage times.
        process_group: the group of ranks loading the same tensors (``None``: the default group).

    Returns:
        ``(stage times of the read, bytes this rank read, seconds spent exchanging)``.

    Raises:
        DistributedError: another rank failed, or a peer died or timed out during the exchange.
        The reading rank's own error (SourceError, HashMismatchError, ...) on the rank that failed.
    """
    import torch.distributed as dist

    group, rank, world = group_of(process_group)
    owner = owners(chunks, world)
    mine = [c for c, o in zip(chunks, owner, strict=True) if o == rank]
    error: BaseException | None = None
    times = StageTimes()
    try:
        times = read(mine)
    except Exception as exc:  # reported to the peers first, then raised here
        error = exc
    device = next(iter(dests.values())).device if dests else torch.device("cpu")
    comm = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t0 = time.perf_counter()
    agree(error, group, comm)
    _exchange(chunks, owner, dests, group, comm)
    return times, sum(c.length for c in mine), time.perf_counter() - t0


def agree(error: BaseException | None, group: Any, comm: torch.device | None = None) -> None:
    """Every rank says whether its step succeeded; raise the own error, or :class:`DistributedError` naming the
    first rank that failed, on every rank (all ranks call it). A status exchange through the store, bounded: a
    peer that died or exited is noticed in seconds (``engine.rankwatch``)."""
    watch = watch_for(group)
    statuses = watch.exchange({"error": None if error is None else describe(error)})
    if error is not None:
        watch.reported = error
        raise error
    failed = [(r, s["error"]) for r, s in statuses.items() if s.get("error")]
    if failed:
        raise DistributedError(f"rank {failed[0][0]} failed: {failed[0][1]}")


def comm_device(process_group: Any = None) -> torch.device:
    """Where the group's collectives run: the current CUDA device for NCCL, else the host."""
    import torch.distributed as dist

    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(read_rows: Callable[[int, int], torch.Tensor], shape: Sequence[int], dtype: torch.dtype,
                process_group: Any = None) -> torch.Tensor:  # fmt: skip
    """The whole tensor on every rank, each rank reading ~1/N of its rows (one contiguous range) and the ranks
    all-gathering the rest. A collective: every rank calls it for the same tensors in the same order.

    Args:
        read_rows: ``read_rows(start, stop)`` reads rows ``[start, stop)`` of the tensor (a CPU tensor).
        shape: the tensor's shape (at least one dimension).
        dtype: its dtype.
        process_group: the ranks sharing the read (default: the default group).

    Returns:
        The tensor, on the collectives' device (:func:`comm_device`).

    Raises:
        DistributedError: another rank failed, or the ranks lost each other.
    """
    import torch.distributed as dist

    group, rank, world = group_of(process_group)
    comm = comm_device(group)
    rows = shape[0]
    per = -(-rows // world)
    a, b = min(rows, rank * per), min(rows, (rank + 1) * per)
    block = torch.zeros((per, *shape[1:]), dtype=dtype, device=comm)
    error: BaseException | None = None
    try:
        if b > a:
            block[: b - a].copy_(read_rows(a, b))
    except Exception as exc:
        error = exc
    agree(error, group, comm)
    parts = [torch.empty_like(block) for _ in range(world)]
    # as bytes: every backend moves uint8, not every one bf16/fp8
    work = dist.all_gather([as_bytes(p) for p in parts], as_bytes(block), group=group, async_op=True)
    watch_for(group).wait(work, "all-gather of rows")
    return torch.cat(parts)[:rows]


def _exchange(chunks: Sequence[Chunk], owner: list[int], dests: dict[str, torch.Tensor], group: Any,
              comm: torch.device) -> None:  # fmt: skip
    import torch.distributed as dist

    flat = {name: as_bytes(t) for name, t in dests.items()}
    watch = watch_for(group)
    bucket = _Bucket(flat, group, comm, watch)
    for src in sorted(set(owner)):
        bucket.src = src
        bucket.global_src = dist.get_global_rank(group, src) if group is not None else src
        for p in (p for c, o in zip(chunks, owner, strict=True) if o == src for p in c.pieces if p.length):
            if p.length >= DIRECT_BYTES and flat[p.entry.name].device == comm:
                watch.wait(dist.broadcast(_view(flat, p), src=bucket.global_src, group=group, async_op=True),
                           f"broadcast from rank {src}")  # fmt: skip
            elif p.length > BUCKET_BYTES:  # large, in memory the backend cannot send from: in parts
                for a in range(0, p.length, BUCKET_BYTES):
                    bucket.add(Piece(p.entry, p.tensor_offset + a, 0, min(BUCKET_BYTES, p.length - a)))
            else:
                bucket.add(p)
        bucket.flush()


class _Bucket:
    """Small pieces of one sending rank, packed and broadcast together."""

    def __init__(self, flat: dict[str, torch.Tensor], group: Any, comm: torch.device, watch: Watch) -> None:
        import torch.distributed as dist

        self.flat, self.group, self.comm, self.watch = flat, group, comm, watch
        self.rank = dist.get_rank(group)
        self.src = self.global_src = 0
        self.pieces: list[Piece] = []
        self.fill = 0
        self.buffer: torch.Tensor | None = None

    def add(self, p: Piece) -> None:
        if self.fill + p.length > BUCKET_BYTES:
            self.flush()
        self.pieces.append(p)
        self.fill += p.length

    def flush(self) -> None:
        import torch.distributed as dist

        if not self.pieces:
            return
        if self.buffer is None:
            self.buffer = torch.empty(BUCKET_BYTES, dtype=torch.uint8, device=self.comm)
        buf = self.buffer
        sending = self.rank == self.src
        pos = 0
        for p in self.pieces if sending else ():
            buf[pos : pos + p.length].copy_(_view(self.flat, p))
            pos += p.length
        work = dist.broadcast(buf[: self.fill], src=self.global_src, group=self.group, async_op=True)
        self.watch.wait(work, f"broadcast from rank {self.src}")
        pos = 0
        for p in self.pieces if not sending else ():
            _view(self.flat, p).copy_(buf[pos : pos + p.length])
            pos += p.length
        self.pieces.clear()
        self.fill = 0


def _view(flat: dict[str, torch.Tensor], p: Piece) -> torch.Tensor:
    return flat[p.entry.name][p.tensor_offset : p.tensor_offset + p.length]
