"""vLLM weight loading: ``--load-format hf_tensorizer`` against vLLM's other load formats, same model, same clock.

vLLM runs in its own venv (``scripts/vllm_env.sh`` builds ``.venv-vllm``; ``scripts/vllm_bench_env.sh`` adds Run:ai's
streamer for ``runai_streamer`` and upstream tensorizer for ``tensorizer``); each vLLM start is a child process of
that venv's Python::

    hf-tensorizer bench vllm --dir /tmp/vllm-bench --runs 2 --cache warm,cold

Builds a Llama-shaped model once (``tests/vllm/build_models.py``; default hidden 1024, 16 layers, vocabulary 32000,
float32: 1.07 GB) as a stock safetensors folder, an artifact and (for ``tensorizer``) upstream tensorizer's file of
the stock model (:func:`~.vllm_peers.tensorize_upstream`), then starts vLLM (``vllm.LLM``, a fresh process
each time, formats alternating) and reads two numbers off its log:

* **vLLM's load step** (:func:`load_step_seconds`): the worker's "Starting to load model" to its first "KV cache"
  line — building the model, the load format's weight loading and the weights' post-processing (on CPU, oneDNN
  repacking of the linear weights). The same two lines for every load format, time-stamped in milliseconds by a
  vLLM logging configuration (:data:`LOGGING`): the fair comparison;
* **the loader's own line** (:func:`weight_seconds`): "Loading weights took X seconds" of ours and vLLM's default
  loader, Run:ai's progress bar (whole seconds); vLLM's tensorizer loader prints none for a file it did not write.

The ``tensorizer`` row is vLLM's tensorizer loader followed by the weights' post-processing it skips on vLLM 0.32
(without it the model serves nothing on the CPU backend): load format ``tensorizer-postprocessed``
(:mod:`hf_tensorizer.integrations.adapters.vllm.peers`), so its load step includes the same repacking as every
other row's.

``--cache warm`` reads the files once before the runs (page cache); ``cold`` evicts them
(``posix_fadvise(DONTNEED)``) before every start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .proc import ROOT
from .vllm_peers import BENCH_PEERS_ENV, tensorize_upstream
from .vllm_peers import LOAD_FORMAT as PEER_TENSORIZER

S3_BUCKET = "bench"

CHILD = """
import json, sys
from vllm import LLM
if __name__ == "__main__":
    model, fmt, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    common = dict(enforce_eager=True, dtype="float32", max_model_len=256, seed=0)
    if fmt == "hf_tensorizer":  # how Python callers serve an artifact: a URI resolves to a local folder first
        from hf_tensorizer.integrations.adapters.vllm import engine_args
        LLM(**engine_args(model, extra, **common))
    else:
        LLM(model=model, load_format=fmt, **common, **({"model_loader_extra_config": extra} if extra else {}))
"""
FORMATS = ("safetensors", "hf_tensorizer", "runai_streamer", "tensorizer")  # the default --formats
# Run:ai's streamer against moto: path-style addressing (no virtual hosts on 127.0.0.1), and a request timeout above
# what moto takes for one ranged GET of a large object (it copies the whole object for each range: 1-2 s per part of
# a 1 GB object); with the streamer's 1 s default every part fails ("File access error")
RUNAI_MOTO_ENV = {"RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS": "60000"}
# more --formats: a load format with an extra config (ours copying every tensor, as before adoption)
VARIANTS = {
    "hf_tensorizer-copy": ("hf_tensorizer", {"adopt": False}),
    "hf_tensorizer-pread": ("hf_tensorizer", {"strategy": "pread"}),  # read into memory of its own, then adopted
    "hf_tensorizer-nolease": ("hf_tensorizer", {"lease": False}),  # kept parameters copied out of the mapping
}
# the `tensorizer` row: vLLM's tensorizer loader plus the post-processing it skips on CPU
# (integrations/adapters/vllm/peers.py), registered by our plugin under this switch, on upstream tensorizer's file
# of the stock model (`tensorizer_uri`)
PEER_ENV = {BENCH_PEERS_ENV: "1"}
LOAD_FORMATS = {"tensorizer": PEER_TENSORIZER}  # a row whose load format has another name
# vLLM's own logging configuration with milliseconds in the time stamp (its stock format has whole seconds)
LOG_FORMAT = "%(levelname)s %(asctime)s.%(msecs)03d pid=%(process)d [%(fileinfo)s:%(lineno)d] %(message)s"
LOGGING = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"vllm": {"()": "vllm.logging_utils.NewLineFormatter", "datefmt": "%m-%d %H:%M:%S",
                            "format": LOG_FORMAT}},
    "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "level": "INFO",
                          "stream": "ext://sys.stdout"}},
    "loggers": {"vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False}},
}  # fmt: skip

# each load format's own weight-loading line (the last one in a log counts)
_OWN_LINES = {
    "hf_tensorizer": re.compile(r"Loading weights took ([0-9.]+) seconds \([^)]*hf_tensorizer"),
    "safetensors": re.compile(r"Loading weights took ([0-9.]+) seconds"),
    "tensorizer": re.compile(r"Deserialized \S+ ?\S* in ([0-9.]+) ?s"),
    # vLLM's Run:ai loader prints no time of its own: its progress bar's elapsed time (whole seconds) at 100 %
    "runai_streamer": re.compile(r"Runai Model Streamer: 100% Completed \| \d+/\d+ \[(\d+:\d\d(?::\d\d)?)<"),
}
_STAMP = re.compile(r" (\d\d):(\d\d):(\d\d(?:\.\d+)?) ")
_START = "Starting to load model"
_AFTER = "KV cache"  # the worker's first step after load_model: sizing the KV cache


def _seconds(text: str) -> float:
    seconds = 0.0
    for part in text.split(":"):  # "12.5", or tqdm's "MM:SS" / "H:MM:SS"
        seconds = seconds * 60 + float(part)
    return seconds


def weight_seconds(load_format: str, log: str) -> float | None:
    """The weight-loading seconds ``load_format``'s own loader printed in a vLLM ``log`` (the last such line).

    Args:
        load_format: ``hf_tensorizer``, ``safetensors`` (vLLM's default loader), ``tensorizer`` (a file vLLM
            tensorized: "Deserialized … in Xs"), ``runai_streamer`` (its progress bar's elapsed whole seconds).
        log: a vLLM process's stdout and stderr.

    Returns:
        Seconds, or ``None`` when there is no such line (or no pattern for ``load_format``).
    """
    pattern = _OWN_LINES.get(load_format)
    found = pattern.findall(log) if pattern else []
    return _seconds(found[-1]) if found else None


def load_step_seconds(log: str) -> float | None:
    """Seconds of vLLM's whole model-loading step, the same two log lines for every load format.

    From the worker's "Starting to load model" to its first "KV cache" line (the step after ``load_model``):
    model construction, the load format's weight loading and the weights' post-processing (on CPU, oneDNN
    repacking). Time stamps with milliseconds when vLLM logs them (:data:`LOGGING`), else whole seconds.

    Args:
        log: a vLLM process's stdout and stderr.

    Returns:
        Seconds, or ``None`` when either line is missing.
    """
    start = None
    for line in log.splitlines():
        if (start is None and _START in line) or (start is not None and _AFTER in line):
            m = _STAMP.search(line)
            if m is None:
                return None
            t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
            if start is None:
                start = t
            else:
                return (t - start) % 86400  # across midnight
    return None


def logging_env() -> dict[str, str]:
    """Environment that makes vLLM log with :data:`LOGGING` (millisecond time stamps) at INFO."""
    config = Path(tempfile.gettempdir()) / "hf_tensorizer-vllm-logging.json"
    config.write_text(json.dumps(LOGGING))
    return {"VLLM_LOGGING_LEVEL": "INFO", "VLLM_LOGGING_CONFIG_PATH": str(config)}


def one(python: str, model: str | Path, load_format: str, keep: Path | None = None, env: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None) -> tuple[float, float | None]:  # fmt: skip
    """vLLM's load step and the loader's own seconds for ``load_format`` loading ``model`` (a folder or an
    ``s3://`` prefix) in a fresh process (its log written to ``keep`` when given; ``env`` added to its environment;
    ``extra`` added to the load format's extra config).

    Raises:
        SystemExit: the run failed or its log has no load step (the log's tail in the message).
    """
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONPATH": str(ROOT),
           **logging_env(), **(env or {})}  # fmt: skip
    fmt, variant = VARIANTS.get(load_format, (LOAD_FORMATS.get(load_format, load_format), {}))
    extra = {**variant, **(extra or {})}
    out = subprocess.run([python, "-c", CHILD, str(model), fmt, json.dumps(extra)], capture_output=True, text=True,
                         env=env, timeout=900)  # fmt: skip
    log = out.stdout + out.stderr
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(log)
    step = load_step_seconds(log)
    if out.returncode != 0 or step is None:
        raise SystemExit(f"{load_format} run failed ({out.returncode}):\n{log[-3000:]}")
    return step, weight_seconds(fmt, log)


def add_vllm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="/tmp/vllm-bench", help="where the model is built (kept for later runs)")
    p.add_argument("--runs", type=int, default=3, help="vLLM starts per load format and page-cache state")
    p.add_argument("--cache", default="warm", help="comma-separated page-cache states: warm, cold")
    p.add_argument("--sources", default="local",
                   help="comma-separated: local (the folders), s3 (the same files on a loopback moto server; "
                        "warm only; vLLM's default loader reads no s3:// and is left out there)")  # fmt: skip
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma-separated load formats ({', '.join((*FORMATS, *VARIANTS))})")  # fmt: skip
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the built model")
    p.add_argument("--layers", type=int, default=16, help="layers of the built model (16: 1.07 GB float32)")
    p.add_argument("--logs", default=None, help="a folder to keep each run's vLLM log in")
    p.add_argument("--json", default=None, help="write the runs here (JSON: command, date, runs per cache and format)")
    p.add_argument("--plot", default=None, help="write a PNG of the load steps here (median and range per format)")
    p.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                   help="the vLLM venv's Python (scripts/vllm_env.sh)")  # fmt: skip


def _split(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    from ..errors import UsageError

    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UsageError(f"--{what}: {bad or text!r} not among {', '.join(allowed)}")
    return items


def vllm_main(args: argparse.Namespace) -> None:
    from ..errors import UsageError

    caches = _split(args.cache, ("warm", "cold"), "cache")
    sources = _split(getattr(args, "sources", "local"), ("local", "s3"), "sources")
    formats = _split(args.formats, (*FORMATS, *VARIANTS), "formats")
    if not os.access(args.python, os.X_OK):
        raise UsageError(f"no vLLM venv at {args.python}: run scripts/vllm_env.sh (or give --python)")
    d = Path(args.dir) / f"h{args.hidden}-l{args.layers}"
    if not (d / "artifact" / "model.tensors").exists():
        subprocess.run([args.python, str(ROOT / "tests" / "vllm" / "build_models.py"), str(d), "--hidden",
                        str(args.hidden), "--layers", str(args.layers), "--vocab", "32000", "--only",
                        "stock,artifact"], check=True)  # fmt: skip
    folders = {"safetensors": "stock", "runai_streamer": "stock", "tensorizer": "stock", "hf_tensorizer": "artifact",
               "hf_tensorizer-copy": "artifact", "hf_tensorizer-pread": "artifact",
               "hf_tensorizer-nolease": "artifact"}  # fmt: skip
    files = [d / "artifact" / "model.tensors", *(d / "stock").glob("*.safetensors")]
    failed: dict[tuple[str, str], str] = {}
    if "tensorizer" in formats:
        try:
            files.append(tensorize_upstream(args.python, d / "stock", d / "tensorizer", "float32"))
        except RuntimeError as exc:  # no upstream tensorizer in the vLLM venv (scripts/vllm_env.sh installs it)
            formats.remove("tensorizer")
            failed.update({(c, "tensorizer"): _cause(str(exc)) for c in caches})
    size = files[0].stat().st_size
    rows: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
    for source in sources:
        with _serving(source, d) as (where, env):
            for cache in caches if source == "local" else ["warm"]:  # moto holds its objects in memory
                names = [n for n in formats if source == "local" or n != "safetensors"]
                for i in range(args.runs):
                    for name in names:
                        if source == "local":
                            _set_cache(files, cache)
                        label = cache if source == "local" else "s3"
                        keep = Path(args.logs) / f"{label}-{name}-{i + 1}.log" if args.logs else None
                        run_env, extra = env, None
                        if name == "tensorizer":  # the stock folder's config, upstream tensorizer's weights file
                            run_env = {**env, **PEER_ENV}
                            extra = {"tensorizer_uri": f"{where}/tensorizer/model.tensors"}
                        try:
                            step, own = one(args.python, f"{where}/{folders[name]}", name, keep, run_env, extra)
                        except SystemExit as exc:  # a format that cannot load here: said, and the others go on
                            failed.setdefault((label, name), _cause(str(exc)))
                            print(f"{label} run {i + 1}: {name:15s} FAILED: {failed[(label, name)]}", flush=True)
                            continue
                        rows.setdefault((label, name), []).append((step, own))
                        own_text = "–" if own is None else f"{own:.2f} s"
                        print(f"{label} run {i + 1}: {name:15s} load step {step:.2f} s, own line {own_text}",
                              flush=True)  # fmt: skip
    print(f"model: {size / 1e9:.2f} GB float32, {args.runs} runs per format and cache state")
    for (cache, name), runs in rows.items():
        steps = [s for s, _ in runs]
        owns = [o for _, o in runs if o is not None]
        own = f"{statistics.median(owns):.2f} s" if owns else "–"
        print(f"{cache:5s} {name:15s} load step median {statistics.median(steps):.2f} s "
              f"(range {min(steps):.2f}-{max(steps):.2f})  own line median {own}  runs {runs}")  # fmt: skip
    for (cache, name), why in failed.items():
        print(f"{cache:5s} {name:15s} failed: {why} (log kept with --logs)")
    runs = {f"{cache} {name}": [{"load_step_s": round(step, 3), "own_line_s": own} for step, own in got]
            for (cache, name), got in rows.items()}  # fmt: skip
    if getattr(args, "json", None):
        import datetime
        import sys

        doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["hf-tensorizer", "bench", "vllm", *sys.argv[3:]]), "bytes": size, "runs": runs,
               "failed": {f"{c} {n}": why for (c, n), why in failed.items()}}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if getattr(args, "plot", None):
        plot_load_steps(runs, f"vLLM load step, {size / 1e9:.2f} GB float32, {args.runs} runs", Path(args.plot))


def plot_load_steps(runs: dict[str, list[dict[str, Any]]], title: str, path: Path) -> None:
    """One panel per page-cache state: vLLM's load step per load format, median with the range of the runs.

    Args:
        runs: ``"CACHE FORMAT"`` (``"warm safetensors"``) -> runs, each with ``load_step_s``.
        title: the figure's title.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caches = list(dict.fromkeys(k.split()[0] for k in runs))
    fig, axes = plt.subplots(1, len(caches), figsize=(5 * len(caches), 4), squeeze=False, sharey=True)
    for ax, cache in zip(axes[0], caches):
        names = [k.split()[1] for k in runs if k.split()[0] == cache]
        steps = [[r["load_step_s"] for r in runs[f"{cache} {n}"]] for n in names]
        mid = [statistics.median(v) for v in steps]
        err = [[m - min(v) for m, v in zip(mid, steps)], [max(v) - m for m, v in zip(mid, steps)]]
        bars = ax.bar(range(len(names)), mid, yerr=err, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"{cache} page cache", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("vLLM load step (s): median, range", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _set_cache(files: list[Path], cache: str) -> None:
    """``cold``: evict ``files`` from the page cache; ``warm``: read them all into it."""
    from ..engine.pagecache import evict

    for f in files:
        if cache == "cold":
            evict(f)
        else:
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def _cause(message: str) -> str:
    """The line of a failed run's log tail that names the error (vLLM's "engine core initialization failed"
    wrapper skipped), else its first line."""
    lines = [x.strip() for x in message.splitlines() if "Error" in x and "initialization failed" not in x]
    return lines[-1][-300:] if lines else message.splitlines()[0]


@contextlib.contextmanager
def _serving(source: str, d: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Where the model folders are for ``source`` and the environment a vLLM process needs to reach them:
    ``local`` the build folder; ``s3`` a moto server on 127.0.0.1 with both folders uploaded under
    ``s3://bench/`` (credentials and endpoint in the ``AWS_*`` variables boto3 and Run:ai's streamer read)."""
    if source == "local":
        yield str(d), {}
        return
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    from .servers import AWS_ENV, moto_server

    with moto_server() as url:
        env = {**AWS_ENV, "AWS_ENDPOINT_URL": url, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               **RUNAI_MOTO_ENV}  # fmt: skip
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                              config=Config(read_timeout=600, retries={"max_attempts": 2}))  # fmt: skip
        one_put = TransferConfig(multipart_threshold=1 << 40)  # moto stalls some multipart uploads: one PUT a file
        client.create_bucket(Bucket=S3_BUCKET)
        for folder in ("artifact", "stock", "tensorizer"):
            for f in sorted((d / folder).iterdir()) if (d / folder).is_dir() else []:
                if f.is_file():
                    client.upload_file(str(f), S3_BUCKET, f"{folder}/{f.name}", Config=one_put)
        client.close()
        yield f"s3://{S3_BUCKET}", env
