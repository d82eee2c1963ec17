"""Benchmark results as a short markdown table, a JSON file and a bar plot."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

# from_pretrained of a tensorized artifact (hftfp) end to end, against our raw deserializer (hft) and stock
# transformers from_pretrained (hf) in the same run; targets for a ~6.5 GB model.
INTEGRATION = ("hftfp", "hft", "hf")
TARGET_OVERHEAD_S = 0.3
TARGET_SPEEDUP = 5.0
# issue 24: our default warm load ≥ 1.0× safetensors ``load_file`` in every round (CPU, fresh processes)
WARM_JUDGED = ("hft", "st")
# Our loader under its explicit warm-CPU strategy: on a warm local file ``auto`` picks ``mmap``, so in a run that
# includes it, it times our code a second time per round: the A/A control of the warm verdict
WARM_CONTROL = "hft-mmap"
WARM_TARGET = 1.0


def _best(rows: list[dict[str, Any]], key: str) -> tuple[str | None, float | None]:
    """The best peer (not ours) by ``key`` among rows whose loads were all correct."""
    cands = [(r[key], r["loader"]) for r in rows if not r["ours"] and r["status"] == "ok" and r[key]]
    if not cands:
        return None, None
    value, name = max(cands)
    return name, value


def limit_names(results: dict[str, Any]) -> tuple[str | None, str | None]:
    """The limits the warm and cold speeds are compared with: host->device (pinned) on CUDA, else the
    parallel page-cache read; for cold, the parallel cold read."""
    lim = results.get("limits") or {}
    warm = (
        "h2d_pinned"
        if "h2d_pinned" in lim
        else next((k for k in lim if k.startswith("read_pagecache_") and not k.endswith("_1t")), None)
    )
    cold = next((k for k in lim if k.startswith("read_cold_")), None)
    return warm, cold


def _median_s(row: dict[str, Any] | None, cold: bool) -> float | None:
    """Seconds of a correct row: its cold run, or the median of its warm runs."""
    if row is None or row["status"] != "ok":
        return None
    if cold:
        return row["cold_s"]  # type: ignore[no-any-return]
    runs = row.get("warm_runs_s") or ([row["warm_s"]] if row["warm_s"] else [])
    return statistics.median(runs) if runs else None


def integration(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``hftfp`` against ``hft`` and ``hf`` of the same run: ``overhead_s`` (hftfp − hft seconds) and
    ``speedup_vs_stock`` (hf ÷ hftfp seconds), from the medians of the warm runs (``cold_*``: the cold run);
    None when the run has no correct ``hftfp`` row."""
    by_name = {r["loader"]: r for r in rows}
    fp, raw, stock = INTEGRATION
    if _median_s(by_name.get(fp), cold=False) is None:
        return None
    out: dict[str, Any] = {
        "loader": fp,
        "raw": raw,
        "stock": stock,
        "warm_runs": len(by_name[fp].get("warm_runs_s") or [None]),
        "target": {"overhead_s": TARGET_OVERHEAD_S, "speedup_vs_stock": TARGET_SPEEDUP},
    }
    for mode in ("warm", "cold"):
        s = {name: _median_s(by_name.get(name), cold=mode == "cold") for name in INTEGRATION}
        prefix = "" if mode == "warm" else "cold_"
        out[f"{mode}_s"] = s
        out[f"{prefix}overhead_s"] = round(s[fp] - s[raw], 4) if s[fp] and s[raw] else None
        out[f"{prefix}speedup_vs_stock"] = round(s[stock] / s[fp], 2) if s[fp] and s[stock] else None
    return out


def integration_line(summary: dict[str, Any]) -> str:
    """One line on ``integration()``'s numbers, with the targets."""
    fp, raw, stock, warm = summary["loader"], summary["raw"], summary["stock"], summary["warm_s"]
    line = (
        f"integration ({fp} = from_pretrained of the tensorized artifact, median of {summary['warm_runs']} warm): "
        f"{_f(summary['overhead_s'], ' s', '+.3f')} over {raw} ({_f(warm[fp], ' s', '.3f')} vs "
        f"{_f(warm[raw], ' s', '.3f')}; target ≤ {TARGET_OVERHEAD_S} s), {_f(summary['speedup_vs_stock'], '×')} "
        f"stock {stock} ({_f(warm[stock], ' s', '.3f')}; target ≥ {TARGET_SPEEDUP:g}×)"
    )
    if summary["cold_overhead_s"] is not None or summary["cold_speedup_vs_stock"] is not None:
        line += (
            f"; cold: {_f(summary['cold_overhead_s'], ' s', '+.3f')} over {raw}, "
            f"{_f(summary['cold_speedup_vs_stock'], '×')} stock {stock}"
        )
    return line


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Add the ratios to each row: ``vs_peer_warm/cold`` (to the best peer), ``of_limit_warm/cold``; and the
    ``integration`` summary (see :func:`integration`) when the run has ``hftfp``."""
    rows = results["rows"]
    lim = results.get("limits") or {}
    best_warm, best_warm_v = _best(rows, "warm_gbps")
    best_cold, best_cold_v = _best(rows, "cold_gbps")
    warm_lim, cold_lim = limit_names(results)
    results["best_peer"] = {"warm": best_warm, "warm_gbps": best_warm_v, "cold": best_cold, "cold_gbps": best_cold_v}
    results["limit_used"] = {"warm": warm_lim, "cold": cold_lim}

    def ratio(v: float | None, ref: float | None) -> float | None:
        return round(v / ref, 3) if v and ref else None

    for r in rows:
        r["vs_peer_warm"] = ratio(r["warm_gbps"], best_warm_v)
        r["vs_peer_cold"] = ratio(r["cold_gbps"], best_cold_v)
        r["of_limit_warm"] = ratio(r["warm_gbps"], lim.get(warm_lim) if warm_lim else None)
        r["of_limit_cold"] = ratio(r["cold_gbps"], lim.get(cold_lim) if cold_lim else None)
    results["rounds"] = round_ratios(rows)
    results["integration"] = integration(rows)
    results["warm_verdict"] = warm_verdict(results)
    return results


def warm_verdict(results: dict[str, Any]) -> dict[str, Any] | None:
    """The warm-load target of issue 24 on this run: our default (``hft``) ÷ safetensors ``load_file`` (``st``)
    round by round, met only when every round reaches :data:`WARM_TARGET` (a failed or wrong ``hft`` misses it).

    Returns:
        ``{"loader", "reference", "ratios", "target", "below", "met", "busy"}`` (plus ``control``, the per-round
        ratios of :data:`WARM_CONTROL` to ``hft``, when the run has that row), or None when the run has no ``hft``
        and correct ``st`` warm rows to compare.
    """
    by_name = {r["loader"]: r for r in results["rows"]}
    ours, ref = (by_name.get(name) for name in WARM_JUDGED)
    if ours is None or ref is None or ref["status"] != "ok" or not ref.get("warm_runs"):
        return None
    ok = ours["status"] == "ok"
    ratios = [round(o / s, 3) for o, s in zip(ours.get("warm_runs") or [], ref["warm_runs"])] if ok else []
    below = sum(r < WARM_TARGET for r in ratios)
    verdict = {"loader": WARM_JUDGED[0], "reference": WARM_JUDGED[1], "ratios": ratios, "target": WARM_TARGET,
               "below": below, "met": ok and bool(ratios) and not below, "busy": results.get("busy", 0),
               "status": ours["status"]}  # fmt: skip
    twin = by_name.get(WARM_CONTROL)
    if ok and twin is not None and twin["status"] == "ok" and twin.get("warm_runs"):
        # the same code timed twice per round: how far apart two runs of one loader land in this condition
        verdict["control"] = [round(t / o, 3) for o, t in zip(ours["warm_runs"], twin["warm_runs"])]
    return verdict


def warm_verdict_line(v: dict[str, Any]) -> str:
    """The judged line of :func:`warm_verdict`: the per-round ratios, the target, ``met`` or ``not met``."""
    cond = f", {v['busy']} CPU-bound processes beside" if v.get("busy") else ""
    runs = ", ".join(f"{x:.2f}" for x in v["ratios"]) or f"none ({v['loader']}: {v['status']})"
    why = "" if v["met"] else f" ({v['below']} of {len(v['ratios'])} rounds below)" if v["ratios"] else ""
    line = (f"JUDGED (issue 24{cond}): {v['loader']} warm ÷ {v['reference']} round by round: {runs}; target ≥ "
            f"{v['target']:g} in every round: {'met' if v['met'] else 'not met'}{why}")  # fmt: skip
    if v.get("control"):
        twin = v["control"]
        line += (f"; A/A control ({WARM_CONTROL} ÷ {v['loader']}, the same code): {min(twin):.2f}–{max(twin):.2f}, "
                 f"{sum(r < v['target'] for r in twin)} of {len(twin)} rounds below")  # fmt: skip
    return line


def round_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per round (the n-th run of every loader ran in the same pass over the loaders), each of our rows ÷ the best
    peer of that round, warm and cold: on a noisy machine a ratio within one round says more than the ratio of
    two bests taken from different minutes."""
    out: dict[str, dict[str, list[float]]] = {}
    peers = [r for r in rows if not r["ours"] and r["status"] == "ok"]
    for r in rows:
        if not r["ours"] or r["status"] != "ok":
            continue
        for mode in ("warm", "cold"):
            ratios = []
            for i, v in enumerate(r.get(f"{mode}_runs") or []):
                best = max((p[f"{mode}_runs"][i] for p in peers if len(p.get(f"{mode}_runs") or []) > i), default=None)
                if best:
                    ratios.append(round(v / best, 3))
            if len(ratios) > 1:
                out.setdefault(r["loader"], {})[mode] = ratios
    return out


def rounds_line(rounds: dict[str, dict[str, list[float]]]) -> str:
    """One line per loader and mode: the per-round ratios and their median."""
    lines = []
    for loader, modes in rounds.items():
        for mode, ratios in modes.items():
            runs, median = ", ".join(f"{x:.2f}" for x in ratios), statistics.median(ratios)
            lines.append(f"{loader} {mode}, ÷ best peer round by round: {runs} (median {median:.2f})")
    return "\n".join(lines)


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The lines printed instead of the table (``--no-table``): the integration summary and the judged warm line."""
    lines = [integration_line(results["integration"])] if results.get("integration") else []
    return lines + ([warm_verdict_line(results["warm_verdict"])] if results.get("warm_verdict") else [])


def _f(v: float | None, suffix: str = "", fmt: str = ".2f") -> str:
    return "–" if v is None else f"{v:{fmt}}{suffix}"


def _g(v: float | None) -> str:
    return _f(v, fmt=".3g")


def format_table(results: dict[str, Any]) -> str:
    """The markdown table (ratios added by ``summarize``), with a line on the machine's limits above it."""
    summarize(results)
    lim = results.get("limits") or {}
    warm_lim, cold_lim = limit_names(results)
    bp = results["best_peer"]
    head = [
        f"{results.get('env', {}).get('gpu', results['device'])}, "
        f"{results.get('bytes', 0) / 1e9:.2f} GB, {results.get('tensors', '?')} tensors"
    ]
    if lim:
        head.append("limits GB/s: " + ", ".join(f"{k} {v:.3g}" for k, v in lim.items()))
    best = [f"{m} {bp[m]} {_g(bp[m + '_gbps'])}" for m in ("warm", "cold") if bp[m]]
    head.append("best peer: " + (", ".join(best) or "none measured"))
    if results.get("stopped"):
        head.append(results["stopped"])
    lines = [
        "| loader | warm GB/s | cold GB/s | warm ÷ best peer | cold ÷ best peer "
        f"| warm ÷ {warm_lim or 'limit'} | cold ÷ {cold_lim or 'limit'} | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        name = f"**{r['loader']}**" if r["ours"] else r["loader"]
        ok = {"ok": "yes", "skipped": "skipped"}.get(r["status"], r["status"].upper())
        if r["note"]:
            ok += f" ({r['note'][:60]})"
        lines.append(
            f"| {name} | {_g(r['warm_gbps'])} | {_g(r['cold_gbps'])} | {_f(r['vs_peer_warm'], '×')} "
            f"| {_f(r['vs_peer_cold'], '×')} | {_f(r['of_limit_warm'])} | {_f(r['of_limit_cold'])} | {ok} |"
        )
    tail = f"\n{integration_line(results['integration'])}\n" if results["integration"] else ""
    if results["rounds"]:
        tail += f"\n{rounds_line(results['rounds'])}\n"
    if results["warm_verdict"]:
        tail += f"\n{warm_verdict_line(results['warm_verdict'])}\n"
    return "\n".join(head) + "\n\n" + "\n".join(lines) + "\n" + tail


def plot(results: dict[str, Any], path: Path) -> bool:
    """Bar plot of warm and cold GB/s per loader, with the limits as lines; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results["rows"] if r["warm_gbps"] or r["cold_gbps"]]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r["warm_gbps"] or 0 for r in rows], 0.4, label="warm (page cache)")
    ax.barh([y + 0.2 for y in ys], [r["cold_gbps"] or 0 for r in rows], 0.4, label="cold")
    ax.set_yticks(list(ys), [r["loader"] for r in rows])
    ax.invert_yaxis()
    lim = results.get("limits") or {}
    for name, style in zip(limit_names(results), ("--", ":"), strict=True):
        if name and name in lim:
            ax.axvline(lim[name], color="gray", linestyle=style, label=f"{name} {lim[name]}")
    ax.set_xlabel("GB/s")
    ax.set_title(f"load {results.get('bytes', 0) / 1e9:.2f} GB to {results['device']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], out: str | Path) -> str:
    """Write results.json, table.md and bench.png into ``out``; return the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, out / "bench.png")
    return table


def save_mode_results(out: str | Path, stem: str, results: dict[str, Any], table: str,
                      plot_to: Callable[[dict[str, Any], Path], bool]) -> None:  # fmt: skip
    """Write a benchmark mode's ``<stem>.json``, ``<stem>.md`` (the table) and ``<stem>.png`` into ``out``, then
    print the table and where the files are."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (folder / f"{stem}.md").write_text(table + "\n")
    plotted = plot_to(results, folder / f"{stem}.png")
    files = f"{stem}.json, {stem}.md" + (f", {stem}.png" if plotted else "")
    print(f"\n{table}\n\nresults in {folder}/ ({files})", flush=True)
