"""Encryption benchmarks: raw block decrypt GB/s per thread count, and encrypted vs plain loads.

Run: ``python -m hf_tensorizer.bench.crypto --mib 512 --dir /tmp`` (add ``--device cuda`` on a GPU box).
Prints one JSON object per measurement line, so results can be pasted into docs/security.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from typing import Any

import torch

from ..crypto.keys import EncryptionKey
from ..crypto.seal import BlockCipher, FileKeys

MiB = 1 << 20


def _decrypt_rate(block: int, total: int, threads: int, public_api: bool = False) -> float:
    """GB/s of opening ``total`` bytes of ``block``-sized blocks on ``threads`` threads."""
    keys = FileKeys(os.urandom(32), os.urandom(32))
    cipher = BlockCipher(keys, block)
    n = max(threads, total // block)
    plain = memoryview(os.urandom(block))
    sealed = [cipher.seal("t", i, plain) for i in range(n)]
    bufs = [bytearray(ct) for ct, _ in sealed]
    macs = [mac for _, mac in sealed]
    nxt = [0]
    lock = threading.Lock()

    def body() -> None:
        from nacl.bindings import crypto_secretbox_open_easy

        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= n:
                return
            if public_api:  # what the documented bindings allow: concat, open to new bytes, copy back
                out = crypto_secretbox_open_easy(macs[i] + bytes(bufs[i]), keys.nonce("t", i), keys.data_key)
                memoryview(bufs[i])[:] = out
            else:
                cipher.open_into("t", i, macs[i], memoryview(bufs[i]))

    ts = [threading.Thread(target=body) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    return n * block / dt / 1e9


def _model(total: int) -> dict[str, torch.Tensor]:
    """A transformer-like mix: a few large matrices, many medium ones, some small vectors."""
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    left, i = total, 0
    sizes = [64 * MiB, 8 * MiB, 8 * MiB, 2 * MiB, 2 * MiB, 2 * MiB, 16 << 10, 16 << 10]
    while left > 0:
        n = min(sizes[i % len(sizes)], left)
        sd[f"layer{i}.weight"] = torch.randn(max(1, n // 2), generator=g, dtype=torch.float32).to(torch.bfloat16)
        left -= n
        i += 1
    return sd


def _load_rate(path: str, device: str, key: EncryptionKey | None, reps: int) -> dict[str, Any]:
    from ..engine.reader import TensorDeserializer

    best: dict[str, Any] = {}
    for _ in range(reps):
        with TensorDeserializer(path, device=device, encryption=key) as d:
            m = d.metrics.as_dict()
        if not best or m["gbps"] > best["gbps"]:
            best = m
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=512, help="model size for load tests")
    ap.add_argument("--decrypt-mib", type=int, default=256, help="bytes per raw decrypt measurement")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--blocks", default="1,4,16", help="block sizes in MiB")
    ap.add_argument("--skip-decrypt", action="store_true")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    blocks = [int(b) * MiB for b in args.blocks.split(",")]
    thread_counts = sorted({1, 2, cores // 2, cores} - {0})
    if not args.skip_decrypt:
        for block in blocks:
            for t in thread_counts:
                rate = _decrypt_rate(block, args.decrypt_mib * MiB, t)
                print(json.dumps({"test": "decrypt", "block_mib": block // MiB, "threads": t, "gbps": round(rate, 3)}))
        for t in (1, cores):
            rate = _decrypt_rate(16 * MiB, args.decrypt_mib * MiB, t, public_api=True)
            print(
                json.dumps({"test": "decrypt-public-bindings", "block_mib": 16, "threads": t, "gbps": round(rate, 3)})
            )
    from ..engine.writer import TensorSerializer

    sd = _model(args.mib * MiB)
    key = EncryptionKey.generate()
    files = []
    plain = os.path.join(args.dir, "bench-plain.tensors")
    with TensorSerializer(plain) as s:
        s.write_state_dict(sd)
    files.append(("plain", plain, None))
    for block in blocks:
        path = os.path.join(args.dir, f"bench-enc-{block // MiB}.tensors")
        t0 = time.perf_counter()
        with TensorSerializer(path, encryption=key, block_size=block) as s:
            s.write_state_dict(sd)
        dt = time.perf_counter() - t0
        print(
            json.dumps(
                {"test": "write-encrypted", "block_mib": block // MiB, "gbps": round(args.mib * MiB / dt / 1e9, 3)}
            )
        )
        files.append((f"encrypted-{block // MiB}MiB", path, key))
    del sd
    results = {}
    for label, path, k in files:
        _load_rate(path, args.device, k, 1)  # warm the page cache
        results[label] = _load_rate(path, args.device, k, args.reps)
        keep = ("gbps", "seconds", "threads", "chunks", "strategy", "verify_gbps", "read_gbps")
        out = {"test": "load", "file": label, "device": args.device, **{x: results[label].get(x) for x in keep}}
        if label != "plain":
            out["ratio_vs_plain"] = round(results[label]["gbps"] / results["plain"]["gbps"], 3)
        print(json.dumps(out))
    for _, path, _ in files:
        os.remove(path)


if __name__ == "__main__":
    main()
