"""The remote benchmark's report: markdown tables and the plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .peers import MiB

__all__ = ["default_ratio", "format_report", "machine", "plot", "verdict", "verdicts"]

TARGET = 0.9  # every target of the remote benchmark is "≥ 0.9 ×" something, judged on the default configuration


def verdict(ratio: float, target: float = TARGET) -> str:
    """``"met"`` when ``ratio`` reaches ``target``, else ``"NOT met"``."""
    return "met" if ratio >= target else "NOT met"


def default_ratio(rows: list[dict[str, Any]], reference: float) -> float:
    """The default configuration's fresh-process load (the row ``ours (default)``) ÷ ``reference`` GB/s: what users
    get, never another configuration of the sweep.

    Raises:
        KeyError: no ``ours (default)`` row (a run without the default cannot be judged).
    """
    row = next((r for r in rows if r["reader"] == "ours (default)"), None)
    if row is None:
        raise KeyError("no 'ours (default)' row: the default configuration was not measured")
    return row["gbps"] / reference if reference > 0 else 0.0


SECTIONS = {"http": "HTTP", "s3": "S3 (moto)", "gcs": "GCS (emulator)", "azure": "Azure Blob (Azurite)"}


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the run, each judged on the default configuration's fresh-process load.

    Per server section: ours (default) ÷ the section's reference (the best reference client on that server; for
    HTTP the best parallel curl into fresh memory), ÷ the best of our own configurations loaded the same way, and
    for S3 on nginx, ours S3 (default) ÷ ours HTTP (default).

    Returns:
        dicts with ``server``, ``target`` (what is compared), ``ratio``, ``met``.
    """
    out: list[dict[str, Any]] = []

    def add(server: str, target: str, ratio: float) -> None:
        out.append({"server": server, "target": target, "ratio": round(ratio, 3), "met": ratio >= TARGET})

    for key, server in SECTIONS.items():
        sec = res.get(key)
        if not sec or not any(r["reader"] == "ours (default)" for r in sec["rows"]):
            continue
        if key == "http":
            server = f"HTTP ({res.get('http_server', '?').split(' (')[0]})"
        add(server, f"ours (default) ≥ 0.9 × reference ({sec.get('ref', 'best reference client')})",
            default_ratio(sec["rows"], sec["ref_gbps"]))  # fmt: skip
        fresh = [r["gbps"] for r in sec["rows"] if r["kind"] == "ours" and r.get("config")]
        if fresh:
            add(server, "ours (default) ≥ 0.9 × best of our configurations", default_ratio(sec["rows"], max(fresh)))
        if "s3_of_http" in sec:
            add("S3 on the same nginx", "ours S3 (default) ≥ 0.9 × ours HTTP (default)", sec["s3_of_http"]["default"])
        if "s3_of_boto3" in sec:
            add("S3 on the same nginx", "ours S3 (default) ≥ 0.9 × boto3 download_fileobj", sec["s3_of_boto3"])
    return out


def format_report(res: dict[str, Any]) -> str:
    """Markdown tables of every section that ran."""
    out = [f"{res['machine']}; {res['date']}; `{res['command']}`", ""]
    if "http" in res:
        h = res["http"]
        out += [f"**HTTP** ({res['http_server']}): {h['file_bytes'] / 1e9:.2f} GB file, {h['tensors']} bf16 tensors; "
                f"best of {h['rounds']} interleaved rounds. Reference: {h['ref']} = {h['ref_gbps']:.3f} GB/s; target "
                f"ours (default) ≥ 0.9 × reference: **{verdict(default_ratio(h['rows'], h['ref_gbps']))}** "
                f"(default config {default_ratio(h['rows'], h['ref_gbps']):.2f}×, transport alone "
                f"{h['transport_of_ref']:.2f}×).", "",
                "| reader | GB/s | ÷ reference |", "|---|---|---|"]  # fmt: skip
        out += [f"| {r['reader']} | {r['gbps']:.3f} | {r['of_ref']:.2f} |" for r in h["rows"]]
        if "s3_of_http" in h:
            out += ["", "S3 (boto3) on the same nginx (anonymous path-style bucket) ÷ our HTTP path, same config: "
                    + ", ".join(f"{c} {v:.2f}×" for c, v in h["s3_of_http"].items())
                    + f"; target (default) ≥ 0.9: **{verdict(h['s3_of_http']['default'])}**."]  # fmt: skip
        out += ["", "Sweep of our knobs, transport only (c = concurrency, k = chunk MiB, p = part MiB):", "",
                "| config | readers | chunk MiB | GB/s |", "|---|---|---|---|"]  # fmt: skip
        out += [f"| {k} | {r['readers']} | {r['chunk_mib']:.0f} | {r['gbps']:.3f} |" for k, r in h["sweep"].items()]
        out.append("")
    if "s3" in res:
        s = res["s3"]
        out += [f"**S3** (moto {res.get('moto', '?')} in its own process): {s['object_bytes'] / 1e6:.0f} MB object; "
                f"best of {s['reps']}. Server figure = best boto3 download into fresh memory ({s['ref']}) = "
                f"{s['ref_gbps']:.3f} GB/s.", "",
                "| reader | GB/s | ÷ server figure |", "|---|---|---|"]  # fmt: skip
        out += [f"| {r['reader']} | {r['gbps']:.3f} | {r['of_ref']:.2f} |" for r in s["rows"]]
        if s.get("memory"):
            m = s["memory"]
            out += ["", f"Memory of the default S3 load (fresh process, transfer {m.get('transfer') or '?'}): "
                    f"peak RSS − before − tensors = {m['overhead'] / MiB:.1f} MiB ({m['readers']} readers × "
                    f"{m['chunk_mib']:.0f} MiB chunks in flight at most)."]  # fmt: skip
        out.append("")
    for key in ("gcs", "azure"):
        if key in res:
            g = res[key]
            out += [f"**{SECTIONS[key]}**: {g['object_bytes'] / 1e6:.0f} MB object; best of {g['reps']} interleaved "
                    f"rounds. Reference: {g['ref']} = {g['ref_gbps']:.3f} GB/s.", "",
                    "| reader | GB/s | ÷ reference | transfer |", "|---|---|---|---|"]  # fmt: skip
            out += [f"| {r['reader']} | {r['gbps']:.3f} | {r['of_ref']:.2f} | {r.get('transfer') or ''} |"
                    for r in g["rows"]]  # fmt: skip
            out.append("")
    if "memory" in res:
        m = res["memory"]
        out += [f"**Memory** (HTTP load to CPU, fresh process each): bounded: **{'yes' if m['bounded'] else 'NO'}**.",
                "", "| model GB | mode | readers | peak RSS − before − tensors (MiB) | bound (MiB) | GB/s |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {r['model_bytes'] / 1e9:.2f} | {r['mode']} | {r['readers']} | {r['overhead'] / MiB:.1f} "
                f"| {r['bound'] / MiB:.0f} | {r['gbps']:.3f} |" for r in m["rows"]]  # fmt: skip
        out.append("")
    judged = verdicts(res)
    if judged:
        out += ["**Verdicts** (each judges the default configuration, fresh processes):", "",
                "| server | target | ratio | verdict |", "|---|---|---|---|"]  # fmt: skip
        out += [f"| {v['server']} | {v['target']} | {v['ratio']:.2f}× | **{verdict(v['ratio'])}** |" for v in judged]
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
    panels = [k for k in ("http", "s3", "gcs", "azure", "memory") if k in res]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    colors = {"ref": "tab:gray", "ref-s3": "tab:green", "ours": "tab:blue", "peer": "tab:orange"}
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
        titles = {**SECTIONS, "http": f"HTTP, {res.get('http_server', '')[:60]}", "s3": "S3 (moto server)",
                  "memory": "memory of HTTP loads to CPU"}  # fmt: skip
        ax.set_title(titles[key], fontsize=10)
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
