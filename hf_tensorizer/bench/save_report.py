"""What ``bench save`` and ``bench save --s3`` share: peak-memory probes, the settle before each writer, the
checkpoint's tensors in fresh memory, and the rows, table and plot of the results."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def status_kib(field: str) -> int:
    """``field`` of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``); 0 where absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def load_state_dict(d: Path) -> dict[str, Any]:
    """The checkpoint's tensors in fresh anonymous memory, as a model's are: read from the prepared safetensors file
    and copied out of its mapping (the seeded generator would take seconds per child on a busy machine)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(d / "hf" / "model.safetensors")).items()}


def settle_disk(seconds: float) -> None:
    """Flush every dirty page and give the disk ``seconds`` to finish, so no writer pays for the one before."""
    if seconds > 0:
        os.sync()
        time.sleep(seconds)


def timed_write(name: str, nbytes: int, write: Callable[[], Any]) -> dict[str, Any]:
    """Run ``write`` (the save, its fsync included where the writer has one) under the clock, CPU times and peak
    RSS (``VmHWM`` reset first); ``nbytes`` is what the throughput counts.

    Returns:
        The result row: writer, seconds, bytes, GB/s, user and system CPU seconds, RSS before and peak above it
        (None where the peak cannot be reset), and ``result``: what ``write`` returned.
    """
    import resource

    peak_ok = reset_peak()
    rss0 = status_kib("VmRSS")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = write()
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = status_kib("VmHWM")
    return {
        "writer": name,
        "seconds": round(seconds, 4),
        "bytes": nbytes,
        "gbps": round(nbytes / seconds / 1e9, 3),
        "user_s": round(r1.ru_utime - r0.ru_utime, 3),
        "sys_s": round(r1.ru_stime - r0.ru_stime, 3),
        "rss_before_mib": round(rss0 / 1024, 1),
        "peak_above_mib": round((peak - rss0) / 1024, 1) if peak_ok else None,
        "result": result,
    }


def run_rounds(
    names: Sequence[str],
    runs: int,
    settle: float,
    start: Callable[[str], subprocess.Popen[str]],
    timeout: float,
    log: Callable[[str], None],
    check: Callable[[str, dict[str, Any]], None] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str], list[list[float]]]:
    """``runs`` rounds of every writer in ``names``, the order rotated each round, each writer a fresh process
    (``start(name)``) after a sync and ``settle`` seconds; ``check(name, result)`` completes a result before it is
    kept. A writer that fails once is left out of later rounds.

    Returns:
        The results by writer (each with its ``round``), the first error line by writer, the load averages
        before each round and after the last.
    """
    from .proc import collect, error_line

    runs_by: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    loads: list[list[float]] = []
    order = list(names)
    for r in range(runs):
        loads.append([round(x, 2) for x in os.getloadavg()])
        for name in order[r % len(order) :] + order[: r % len(order)]:
            if name in errors:
                continue
            settle_disk(settle)
            res, out = collect(start(name), timeout)
            if res is None:
                errors[name] = error_line(out)
                log(f"  {name:<8} ERROR: {errors[name]}")
                continue
            res["round"] = r
            if check is not None:
                check(name, res)
            runs_by[name].append(res)
            log(f"  round {r + 1}  {name:<8} {res['seconds']:7.3f} s  {res['gbps']:6.3f} GB/s  "
                f"peak +{res['peak_above_mib']} MiB")  # fmt: skip
    loads.append([round(x, 2) for x in os.getloadavg()])
    return runs_by, errors, loads


def summarize(runs_by: dict[str, list[dict[str, Any]]], writers: Mapping[str, tuple[str, bool]],
              baseline: Mapping[str, tuple[str, ...]]) -> list[dict[str, Any]]:  # fmt: skip
    """One row per writer: best / median / worst GB/s, peak memory, and for ours the ratio to its baseline (the
    fastest of them), best against best and round by round (ours ÷ the fastest baseline of the same round)."""
    rows = []
    for name, runs in runs_by.items():
        if not runs:
            continue
        g = [x["gbps"] for x in runs]
        row: dict[str, Any] = {
            "writer": name, "label": writers[name][0], "ours": writers[name][1],
            "best_gbps": max(g), "median_gbps": round(statistics.median(g), 3), "worst_gbps": min(g),
            "peak_above_mib": max((x["peak_above_mib"] or 0) for x in runs),
            "ok": all(x["ok"] for x in runs),
        }  # fmt: skip
        base = [b for b in baseline.get(name, ()) if runs_by.get(b)]
        if base:
            best_peer = max(max(x["gbps"] for x in runs_by[b]) for b in base)
            row["vs"] = ",".join(base)
            row["ratio_best"] = round(max(g) / best_peer, 3)
            per_round = []
            for x in runs:
                same = [y["gbps"] for b in base for y in runs_by[b] if y["round"] == x["round"]]
                if same:
                    per_round.append(round(x["gbps"] / max(same), 3))
            row["ratio_rounds"] = per_round
            if per_round:
                row["ratio_median"] = round(statistics.median(per_round), 3)
        rows.append(row)
    return rows


def format_table(results: dict[str, Any]) -> str:
    """A markdown table of the rows."""
    lines = [
        f"{results['tensors']} tensors, {results['bytes'] / 1e9:.2f} GB bf16; load average per round: "
        + ", ".join(f"{la[0]:.1f}" for la in results["loadavg"]),
        "",
        "| writer | GB/s best | median | worst | peak RSS above before, MiB | vs | ratio best/best | "
        "per round (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        per = ", ".join(f"{x:.2f}" for x in r.get("ratio_rounds", []))
        med = f" ({r['ratio_median']:.2f})" if "ratio_median" in r else ""
        name = f"**{r['writer']}**" if r["ours"] else r["writer"]
        lines.append(
            f"| {name} {r['label']} | {r['best_gbps']:.3f} | {r['median_gbps']:.3f} | {r['worst_gbps']:.3f} | "
            f"{r['peak_above_mib']:.1f} | {r.get('vs', '')} | {r.get('ratio_best', '')} | {per}{med} |"
        )
    for name, why in results["errors"].items():
        lines.append(f"\n{name}: error: {why}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Bars of the median GB/s with the best-to-worst range, ours highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    y = range(len(rows))
    med = [r["median_gbps"] for r in rows]
    err = [[m - r["worst_gbps"] for m, r in zip(med, rows)], [r["best_gbps"] - m for m, r in zip(med, rows)]]
    ax.barh(list(y), med, xerr=err, color=["tab:orange" if r["ours"] else "tab:gray" for r in rows], capsize=3)
    ax.set_yticks(list(y), [f"{r['writer']}: {r['label']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    where = "to S3 (moto on loopback)" if results.get("s3") else "write + fsync"
    ax.set_xlabel(f"GB/s (median, bars: best-worst), {where}")
    ax.set_title(f"save, {results['bytes'] / 1e9:.2f} GB bf16, fresh processes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
