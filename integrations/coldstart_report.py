"""Reading and judging the scale-from-zero benchmark's results (``integrations/coldstart.py``).

* :func:`weight_seconds` — a service log's weight-loading time, from each loader's own line: vLLM's default
  loader and ours print "Loading weights took X seconds", vLLM's tensorizer loader "Deserialized … in Xs" (for a
  file vLLM tensorized; a checkpoint's tensors go through ``model.load_weights`` with no line), the Run:ai loader
  only its progress bar (elapsed whole seconds at 100 %); parsed by ``hf_tensorizer.bench.vllm``;
* :func:`phase_seconds` — vLLM's whole model-loading step, the same two log lines for every load format
  (:func:`hf_tensorizer.bench.vllm.load_step_seconds`, which ``hf-tensorizer bench vllm`` reports too);
* :func:`summarize` — median and range of every metric per row;
* :func:`verdicts` — the issue's two targets, judged on the default configuration of every row, per source and
  page cache: our weight loading ≥ 1.0× the fastest other vLLM load format, and our time to first response ≤ the
  fastest row's;
* :func:`table` / :func:`plot` — the Markdown table and the chart for docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from hf_tensorizer.bench import vllm as vllm_bench

METRICS = ("ready_s", "first_s", "mean_s", "p50_s", "p95_s", "max_s", "peak_rss_gb", "load_s", "model_s")
# rows run with their defaults, ours and the others (predictor-mapped is a non-default option of ours)
OURS_DEFAULT = ("vllm", "predictor")
OTHERS = ("vllm-default", "vllm-runai", "vllm-tensorizer", "predictor-stock")
VLLM_OTHERS = ("vllm-default", "vllm-runai", "vllm-tensorizer")
DOWNLOADED = ("vllm-default", "predictor-stock")  # from S3: the folder is downloaded, then loaded locally
# each vLLM row's load format: its own weight-loading line and vLLM's load step are read by the vLLM bench's
# parsers (hf_tensorizer.bench.vllm), the one place that knows those log lines
_FORMATS = {"vllm": "hf_tensorizer", "vllm-default": "safetensors", "vllm-tensorizer": "tensorizer",
            "vllm-runai": "runai_streamer"}  # fmt: skip


def weight_seconds(row: str, log: str) -> float | None:
    """The weight-loading seconds a ``row``'s own loader printed in its service ``log`` (the last such line;
    :func:`hf_tensorizer.bench.vllm.weight_seconds`).

    Args:
        row: a vLLM row name (``vllm``, ``vllm-default``, ``vllm-runai``, ``vllm-tensorizer``).
        log: the service's stdout and stderr.

    Returns:
        Seconds, or ``None`` when the row has no such line (the predictor rows: their time is on ``/metrics``).
    """
    return vllm_bench.weight_seconds(_FORMATS[row], log) if row in _FORMATS else None


phase_seconds = vllm_bench.load_step_seconds  # vLLM's whole load step, the same two log lines for every format


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median of every metric per row, and ``range`` (min, max) per metric; rows without a run are left out.

    Args:
        runs: ``"ROW SOURCE CACHE"`` → one dict of :data:`METRICS` per run (a value may be ``None``).

    Returns:
        ``"ROW SOURCE CACHE"`` → ``{metric: median or None, ..., "range": {metric: [min, max]}, "runs": n}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, results in runs.items():
        if not results:
            continue
        entry: dict[str, Any] = {"range": {}, "runs": len(results)}
        for m in METRICS:
            values = [r[m] for r in results if r.get(m) is not None]
            entry[m] = statistics.median(values) if values else None
            if values:
                entry["range"][m] = [min(values), max(values)]
        out[key] = entry
    return out


def _groups(summary: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for key in summary:
        source, cache = key.split()[1:3]
        if (source, cache) not in seen:
            seen.append((source, cache))
    return seen


def _best(summary: dict[str, dict[str, Any]], rows: tuple[str, ...], group: tuple[str, str], metric: str
          ) -> tuple[str, float] | None:  # fmt: skip
    found = [(summary[k][metric], r) for r in rows if (k := f"{r} {group[0]} {group[1]}") in summary
             and summary[k].get(metric) is not None]  # fmt: skip
    return (min(found)[1], min(found)[0]) if found else None


def verdicts(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The two targets per source and page cache, each ``met``, ``not met`` or ``not measured``.

    * ``weights``: ``vllm`` (``--load-format hf_tensorizer``)'s weight-loading seconds against the fastest of the
      other vLLM load formats; ``ratio`` = theirs ÷ ours, met when ≥ 1.0;
    * ``load step``: the same on vLLM's whole model-loading step (:func:`phase_seconds`), the same clock for every
      format: a loader that maps the file and leaves its page faults to the weights' post-processing is charged
      for them here;
    * ``first response``: the fastest of our default rows (``vllm``, ``predictor``) against the fastest other
      row; ``ratio`` = theirs ÷ ours, met when ours ≤ theirs.

    Args:
        summary: :func:`summarize`'s output.

    Returns:
        One dict per target and group: target, source, cache, ours (row, seconds), best_other (row, seconds),
        ratio, verdict.
    """
    out = []
    for group in _groups(summary):
        for target, ours_rows, other_rows, metric in (
            ("weights", ("vllm",), VLLM_OTHERS, "load_s"),
            ("load step", ("vllm",), VLLM_OTHERS, "model_s"),
            ("first response", OURS_DEFAULT, OTHERS, "first_s"),
        ):
            if group[0] != "local" and metric != "first_s":
                # from S3 vLLM's default loader reads a copy downloaded before vLLM started: its load time is a
                # local load, the download is in its time to ready and first response
                other_rows = tuple(r for r in other_rows if r not in DOWNLOADED)
            ours, other = _best(summary, ours_rows, group, metric), _best(summary, other_rows, group, metric)
            ratio = other[1] / ours[1] if ours and other and ours[1] > 0 else None
            verdict = "not measured" if ratio is None else ("met" if ratio >= 1.0 else "not met")
            out.append({"target": target, "source": group[0], "cache": group[1], "ours": ours, "best_other": other,
                        "ratio": ratio, "verdict": verdict})  # fmt: skip
    return out


def _fmt(v: float | None, unit: str = " s") -> str:
    return "–" if v is None else f"{v:.1f}{unit}"


def table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: one line per row (medians; the range of first response when there were several runs)."""
    lines = ["| row | source | cache | ready | first response | mean | p50 | p95 | peak RSS | weight loading | "
             "vLLM load step |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, v in summary.items():
        row, source, cache = key.split()
        first = _fmt(v["first_s"])
        if v["runs"] > 1 and "first_s" in v["range"]:
            first += " ({:.1f}–{:.1f})".format(*v["range"]["first_s"])
        lines.append(f"| `{row}` | {source} | {cache} | {_fmt(v['ready_s'])} | {first} | {_fmt(v['mean_s'])} | "
                     f"{_fmt(v['p50_s'])} | {_fmt(v['p95_s'])} | {_fmt(v['peak_rss_gb'], ' GB')} | "
                     f"{_fmt(v['load_s'])} | {_fmt(v.get('model_s'))} |")  # fmt: skip
    return "\n".join(lines)


def verdict_table(found: list[dict[str, Any]]) -> str:
    """Markdown: one line per :func:`verdicts` entry."""
    lines = ["| target | source, cache | ours | fastest other | theirs ÷ ours | verdict |", "|---|---|---|---|---|---|"]
    for v in found:
        ours = f"`{v['ours'][0]}` {v['ours'][1]:.1f} s" if v["ours"] else "–"
        other = f"`{v['best_other'][0]}` {v['best_other'][1]:.1f} s" if v["best_other"] else "–"
        ratio = "–" if v["ratio"] is None else f"{v['ratio']:.2f}×"
        lines.append(f"| {v['target']} | {v['source']}, {v['cache']} | {ours} | {other} | {ratio} | "
                     f"**{v['verdict']}** |")  # fmt: skip
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """One panel per source and page cache: weight loading, vLLM's load step, ready, first response, p95 per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(summary)
    shown = ("load_s", "model_s", "ready_s", "first_s", "p95_s")
    labels = ("weight loading\n(loader's line)", "vLLM load step", "ready", "first response", "p95")
    colors = {row: f"C{i}" for i, row in enumerate(dict.fromkeys(k.split()[0] for k in summary))}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.8), squeeze=False)
    for ax, (source, cache) in zip(axes[0], groups):
        rows = [k for k in summary if k.split()[1:3] == [source, cache]]
        width = 0.8 / max(1, len(rows))
        for i, key in enumerate(rows):
            xs = [j + i * width for j in range(len(shown))]
            row = key.split()[0]
            bars = ax.bar(xs, [summary[key].get(m) or 0 for m in shown], width, label=row, color=colors[row])
            ax.bar_label(bars, fmt="%.0f", fontsize=6)
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(shown))], labels, fontsize=7)
        ax.set_title(f"{source}, {cache} page cache", fontsize=9)
        ax.set_ylabel("seconds (weight loading: the loader's own; others: since spawn)", fontsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
