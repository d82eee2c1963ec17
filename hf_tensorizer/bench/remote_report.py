"""The remote benchmark's report: markdown tables and the plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .peers import MiB

__all__ = ["format_report", "machine", "plot"]


def format_report(res: dict[str, Any]) -> str:
    """Markdown tables of every section that ran."""
    out = [f"{res['machine']}; {res['date']}; `{res['command']}`", ""]
    if "http" in res:
        h = res["http"]
        out += [f"**HTTP** ({res['http_server']}): {h['file_bytes'] / 1e9:.2f} GB file, {h['tensors']} bf16 tensors; "
                f"best of {h['rounds']} interleaved rounds. Reference: {h['ref']} = {h['ref_gbps']:.3f} GB/s; target "
                f"ours ≥ 0.9 × reference: **{'met' if h['target_met'] else 'NOT met'}** (default config "
                f"{h['default_of_ref']:.2f}×, transport alone {h['transport_of_ref']:.2f}×).", "",
                "| reader | GB/s | ÷ reference |", "|---|---|---|"]  # fmt: skip
        out += [f"| {r['reader']} | {r['gbps']:.3f} | {r['of_ref']:.2f} |" for r in h["rows"]]
        if "s3_of_http" in h:
            out += ["", "S3 (boto3) on the same nginx (anonymous path-style bucket) ÷ our HTTP path, same config: "
                    + ", ".join(f"{c} {v:.2f}×" for c, v in h["s3_of_http"].items())
                    + f"; target ≥ 0.9: **{'met' if h['s3_target_met'] else 'NOT met'}**."]  # fmt: skip
        out += ["", "Sweep of our knobs, transport only (c = concurrency, k = chunk MiB, p = part MiB):", "",
                "| config | readers | chunk MiB | GB/s |", "|---|---|---|---|"]  # fmt: skip
        out += [f"| {k} | {r['readers']} | {r['chunk_mib']:.0f} | {r['gbps']:.3f} |" for k, r in h["sweep"].items()]
        out.append("")
    if "s3" in res:
        s = res["s3"]
        out += [f"**S3** (moto {res.get('moto', '?')} in its own process): {s['object_bytes'] / 1e6:.0f} MB object; "
                f"best of {s['reps']}. Server figure = best boto3 download = {s['ref_gbps']:.3f} GB/s.", "",
                "| reader | GB/s | ÷ server figure |", "|---|---|---|"]  # fmt: skip
        out += [f"| {r['reader']} | {r['gbps']:.3f} | {r['of_ref']:.2f} |" for r in s["rows"]]
        out.append("")
    if "memory" in res:
        m = res["memory"]
        out += [f"**Memory** (HTTP load to CPU, fresh process each): bounded: **{'yes' if m['bounded'] else 'NO'}**.",
                "", "| model GB | mode | readers | peak RSS − before − tensors (MiB) | bound (MiB) | GB/s |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {r['model_bytes'] / 1e9:.2f} | {r['mode']} | {r['readers']} | {r['overhead'] / MiB:.1f} "
                f"| {r['bound'] / MiB:.0f} | {r['gbps']:.3f} |" for r in m["rows"]]  # fmt: skip
        out.append("")
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> bool:
    """One panel per section; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [k for k in ("http", "s3", "memory") if k in res]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    colors = {"ref": "tab:gray", "ours": "tab:blue", "peer": "tab:orange"}
    for ax, key in zip([a[0] for a in axes], panels, strict=True):
        if key == "memory":
            rows = res[key]["rows"]
            labels = [f"{r['model_bytes'] / 1e9:.2f} GB {r['mode']}" for r in rows]
            ys = range(len(rows))
            ax.barh([y - 0.2 for y in ys], [r["overhead"] / MiB for r in rows], 0.4, label="measured overhead")
            ax.barh([y + 0.2 for y in ys], [r["bound"] / MiB for r in rows], 0.4, color="tab:gray", label="bound")
            ax.set_yticks(list(ys), labels)
            ax.set_xlabel("MiB (peak RSS − RSS before − tensor bytes)")
            ax.legend(fontsize=8)
        else:
            rows = res[key]["rows"]
            ax.barh(range(len(rows)), [r["gbps"] for r in rows], color=[colors[r["kind"]] for r in rows])
            ax.set_yticks(range(len(rows)), [r["reader"] for r in rows])
            ax.axvline(res[key]["ref_gbps"], color="k", linestyle="--", linewidth=0.8)
            if key == "http":
                ax.axvline(0.9 * res[key]["ref_gbps"], color="tab:red", linestyle=":", label="0.9 × reference")
                ax.legend(fontsize=8, loc="lower right")
            ax.set_xlabel("GB/s")
        ax.invert_yaxis()
        ax.set_title({"http": f"HTTP, {res.get('http_server', '')[:60]}", "s3": "S3 (moto server)",
                      "memory": "memory of HTTP loads to CPU"}[key], fontsize=10)  # fmt: skip
    fig.suptitle(f"{res['machine']}, {res['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, loopback"
