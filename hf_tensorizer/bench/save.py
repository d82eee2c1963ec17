"""``hf-tensorizer bench save``: write throughput of our serializer against safetensors, torch.save and upstream
tensorizer, each writer in a fresh process, every written file fsynced inside the timer.

The tensors are the load benchmark's seeded Llama-shaped bf16 checkpoint (``bench/checkpoint.py``), generated in
each child before its timer. Writers of a state dict (``hft``, ``hft-enc``, ``st``, ``pt``, ``tz``) write it as
it is; ``hftsp`` / ``hfsp`` write a model holding those tensors (``save_pretrained`` tensorized / stock
safetensors), loaded with ``from_pretrained`` as a saved model usually is; ``hftser`` / ``hfconv`` convert the
stock safetensors folder (``serialize --hf-model-id DIR`` against stock ``from_pretrained`` + ``save_pretrained``),
so their time includes reading it. Each child also
reports the save's peak resident memory above what it held before the timer (``VmHWM``, reset through
``/proc/self/clear_refs``). Before each writer the parent syncs and lets the disk settle (``--settle``, 2 s), so
no writer pays for the previous one's writeback. Rounds rotate the writers' order; ratios to the fastest peer are
given best against best and round by round.

``--s3`` times S3 writes instead, against moto's ``ThreadedMotoServer`` on 127.0.0.1 (in its own process) through
real boto3: ours (``TensorSerializer("s3://…")``, a streaming multipart upload) against boto3 ``upload_file`` of
the same bytes (our file, written to local disk before the rounds), each in a fresh process with its client made
inside the timer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .proc import MARK, Log, log, popen
from .save_report import format_table, load_state_dict, plot, run_rounds, timed_write
from .save_report import summarize as summarize_rows

MODULE = "hf_tensorizer.bench.save"


@dataclass(frozen=True)
class Writer:
    """One way of saving: what it needs before the timer (``state_dict``, ``model`` or ``folder``) and its call."""

    name: str
    label: str
    needs: str
    modules: tuple[str, ...]
    fn: Callable[[Any, Path, Path], None]  # (state dict | model | source folder, output dir, checkpoint dir)
    ours: bool = False


def _hft(sd: Any, out: Path, d: Path, **options: Any) -> None:
    from hf_tensorizer import TensorSerializer

    with TensorSerializer(str(out / "model.tensors"), **options) as s:
        s.write_state_dict(sd)


def _hft_enc(sd: Any, out: Path, d: Path) -> None:
    from hf_tensorizer.crypto import EncryptionKey

    _hft(sd, out, d, encryption=EncryptionKey(bytes(range(32))))


def _hftsp(model: Any, out: Path, d: Path) -> None:
    model.save_pretrained(str(out), tensorized=True)


def _hftser(src: Any, out: Path, d: Path) -> None:
    from hf_tensorizer.cli.serialize import serialize_model

    serialize_model(str(src), str(out))


def _st(sd: Any, out: Path, d: Path) -> None:
    from safetensors.torch import save_file

    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})


def _pt(sd: Any, out: Path, d: Path) -> None:
    import torch

    torch.save(sd, out / "model.bin")


def _tz(sd: Any, out: Path, d: Path) -> None:
    from tensorizer import TensorSerializer as UpstreamSerializer

    s = UpstreamSerializer(str(out / "model.tensors"))
    s.write_state_dict(sd)
    s.close()


def _hfsp(model: Any, out: Path, d: Path) -> None:
    model.save_pretrained(str(out))


def _hfconv(src: Any, out: Path, d: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(str(out))


_TF = ("transformers",)
# what our writer imports on first use, before the timer as every peer's module is (the engine package imports
# lazily; isal is the CRC32 that hashing picks on first use)
_ENGINE = ("hf_tensorizer.engine.writer", "isal.isal_zlib")
_SER = (*_TF, *_ENGINE, "hf_tensorizer.cli.serialize")
WRITERS: dict[str, Writer] = {
    w.name: w
    for w in (
        Writer("hft", "ours TensorSerializer.write_state_dict", "state_dict", _ENGINE, _hft, True),
        Writer("hft-enc", "ours, encrypted (XSalsa20-Poly1305)", "state_dict", (*_ENGINE, "nacl"), _hft_enc, True),
        Writer("hftsp", "ours save_pretrained(tensorized=True)", "model", (*_TF, *_ENGINE), _hftsp, True),
        Writer("hftser", "ours serialize --hf-model-id LOCAL_DIR", "folder", _SER, _hftser, True),
        Writer("st", "safetensors save_file", "state_dict", ("safetensors.torch",), _st),
        Writer("pt", "torch.save", "state_dict", (), _pt),
        Writer("tz", "upstream tensorizer TensorSerializer", "state_dict", ("tensorizer",), _tz),
        Writer("hfsp", "transformers save_pretrained (safetensors)", "model", _TF, _hfsp),
        Writer("hfconv", "transformers from_pretrained + save_pretrained", "folder", _TF, _hfconv),
    )
}
# what each of ours is compared with: the state-dict writers against the fastest state-dict peer, the others
# against the stock call doing the same job
BASELINE = {
    "hft": ("st", "pt", "tz"),
    "hft-enc": ("hft",),
    "hftsp": ("hfsp", "st", "pt", "tz"),
    "hftser": ("hfconv",),
}
PEER_GROUP = ("st", "pt", "tz")


# One save, in this process ------------------------------------------------------------------------------


def _fsync_tree(out: Path) -> int:
    """fsync every file under ``out`` (and the folders), so every writer pays for durable bytes; returns bytes."""
    total = 0
    for root, _, files in os.walk(out):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return total


def _prepared(w: Writer, d: Path) -> tuple[Any, int]:
    """What ``w`` writes, built before the timer, and the tensor bytes it holds."""
    import torch

    spec = json.loads((d / "spec.json").read_text())["tensors"]
    nbytes = sum(2 * _numel(s) for _, s in spec)
    if w.needs == "folder":
        import transformers

        _ = transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM  # resolve the lazy modules
        return d / "hf", nbytes
    sd = load_state_dict(d)
    if w.needs == "state_dict":
        return sd, nbytes
    from transformers import AutoModelForCausalLM

    if w.name == "hftsp":
        import hf_tensorizer

        hf_tensorizer.enable()
    # The model a user saves comes from from_pretrained (or a fine-tune of one), which records the checkpoint
    # conversions it applied; a model built from a config makes save_pretrained rebuild transformers' table of every
    # architecture's conversions (~0.1 s of regex compiling, stock and ours alike). Its parameters are then
    # replaced by the copies in fresh memory, as the state-dict writers get them.
    model = AutoModelForCausalLM.from_pretrained(str(d / "hf"), dtype=torch.bfloat16)
    model.load_state_dict(sd, assign=True)
    return model, nbytes


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def save_one(d: str | Path, name: str) -> dict[str, Any]:
    """Time one save by writer ``name`` in this process (output under ``d/out-NAME``, removed after)."""
    import importlib

    d = Path(d)
    w = WRITERS[name]
    for mod in w.modules:
        importlib.import_module(mod)
    obj, nbytes = _prepared(w, d)
    out = d / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def write() -> int:
        w.fn(obj, out, d)
        return _fsync_tree(out)  # every writer pays for durable bytes

    row = timed_write(name, nbytes, write)
    shutil.rmtree(out, ignore_errors=True)
    file_bytes = row.pop("result")
    return {**row, "file_bytes": file_bytes, "ok": file_bytes >= nbytes}


# The benchmark -------------------------------------------------------------------------------------------


def run_save_bench(
    d: str | Path,
    writers: Sequence[str],
    *,
    layers: int,
    hidden: int,
    vocab: int,
    runs: int,
    timeout: float = 300.0,
    settle: float = 2.0,
    log: Log = log,
) -> dict[str, Any]:
    """Prepare the checkpoint (its safetensors folder is ``hftser``'s input), then ``runs`` rounds of every
    writer in a fresh process, the order rotated each round, after a sync and ``settle`` seconds. Returns the rows
    and every run's numbers."""
    from .checkpoint import prepare

    d = Path(d)
    unknown = [n for n in writers if n not in WRITERS]
    if unknown:
        raise KeyError(f"unknown writers {unknown}; choose from {', '.join(WRITERS)}")
    meta = prepare(d, layers, hidden, vocab, "cpu", ["st"], log=log)
    runs_by, errors, loads = run_rounds(writers, runs, settle, lambda name: popen(["one", str(d), name], module=MODULE),
                                        timeout, log)  # fmt: skip
    return {
        "bytes": meta["bytes"],
        "tensors": meta["tensors"],
        "shape": meta["shape"],
        "runs": runs_by,
        "errors": errors,
        "loadavg": loads,
        "rows": summarize(runs_by),
    }


def summarize(runs_by: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per writer of ``WRITERS`` (see :func:`save_report.summarize`), ours against ``BASELINE``."""
    return summarize_rows(runs_by, {n: (w.label, w.ours) for n, w in WRITERS.items()}, BASELINE)


# CLI -----------------------------------------------------------------------------------------------------


def add_save_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hf-tensorizer bench save`` options."""
    parser.add_argument("--dir", default=".bench/save", help="checkpoint directory (prepared when missing)")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers (default 3: 0.59 GB with the rest)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--writers", default=",".join(WRITERS), help="comma-separated: " + ", ".join(WRITERS))
    parser.add_argument("--runs", type=int, default=3, help="rounds (each writer once per round)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per save")
    parser.add_argument("--out", default=".bench/results", help="where save.json, save.md, save.png go")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after a sync before each writer")
    parser.add_argument(
        "--s3", action="store_true", help="S3 writes instead: ours against boto3 upload_file, to a loopback moto server"
    )
    parser.add_argument("--clean", action="store_true", help="delete the checkpoint directory afterwards")


def save_main(args: argparse.Namespace) -> int:
    """Run the save benchmark from parsed options; 1 when one of our writers failed."""
    common = dict(layers=args.layers, hidden=args.hidden, vocab=args.vocab, runs=max(1, args.runs),
                  timeout=args.timeout, settle=args.settle)  # fmt: skip
    ours = {n for n, w in WRITERS.items() if w.ours}
    if getattr(args, "s3", False):
        from .save_s3 import OURS, run_s3_save_bench

        results = run_s3_save_bench(args.dir, **common)
        ours |= set(OURS)
        stem = "save-s3"
    else:
        writers = [x.strip() for x in args.writers.split(",") if x.strip()]
        results = run_save_bench(args.dir, writers, **common)
        stem = "save"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    table = format_table(results)
    (out / f"{stem}.md").write_text(table + "\n")
    if results["rows"]:
        plot(results, out / f"{stem}.png")
    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"results in {out}/ ({stem}.json, {stem}.md, {stem}.png)\n\n{table}", flush=True)
    bad = [n for n in results["errors"] if n in ours] + [r["writer"] for r in results["rows"] if not r["ok"]]
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "one":
        print(MARK + json.dumps(save_one(argv[1], argv[2])), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="hf-tensorizer bench save", description=__doc__.splitlines()[0])
    add_save_arguments(parser)
    return save_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
