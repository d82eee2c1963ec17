"""The scale benchmark's fits, table and plot: is load time linear in model size, is the overhead constant?"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["fit", "fit_all", "format_table", "plot", "t_pvalue"]

MiB = 2**20
SIGNIFICANT = 0.05  # p below which the quadratic term counts as real
NEGLIGIBLE = 0.05  # share of the fitted time at the largest size below which it does not matter either way
MEM_TOLERANCE = 16 * MiB  # fitted change of the overhead across the sizes that still counts as constant


def t_pvalue(t: float, dof: int) -> float:
    """Two-sided p-value of Student's t with ``dof`` degrees of freedom.

    With x = √dof·tan θ the density is ∝ cos^(dof−1) θ on [0, π/2): the tail is a smooth integral on a bounded
    interval (Simpson's rule), accurate for small p too.
    """
    theta = math.atan(abs(t) / math.sqrt(dof))

    def integral(a: float, b: float, n: int = 2000) -> float:
        h = (b - a) / n
        f = [math.cos(a + i * h) ** (dof - 1) for i in range(n + 1)]
        return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    return max(0.0, min(1.0, integral(theta, math.pi / 2) / integral(0.0, math.pi / 2)))


def fit(xs: list[float], ys: list[float]) -> dict[str, Any]:
    """Least squares y = a + b·x, and y = a + b·x + c·x² where three distinct x allow it.

    Returns:
        ``{"a", "b", "residuals", "rms", "r2", "quad": {"a", "b", "c", "se_c", "t", "p", "share_at_max"} | None,
        "linear": bool, "superlinear": bool}``; ``linear``: the quadratic term is not significant (p ≥
        :data:`SIGNIFICANT`) or its share of the fitted time at the largest x is below :data:`NEGLIGIBLE`;
        ``superlinear``: c > 0, significant and not negligible.
    """
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    lin = np.column_stack([np.ones_like(x), x])
    (a, b), *_ = np.linalg.lstsq(lin, y, rcond=None)
    res = y - (a + b * x)
    tss = float(((y - y.mean()) ** 2).sum())
    out: dict[str, Any] = {
        "a": float(a),
        "b": float(b),
        "residuals": [float(r) for r in res],
        "rms": float(np.sqrt((res**2).mean())),
        "r2": 1 - float((res**2).sum()) / tss if tss > 0 else 1.0,
        "quad": None,
        "linear": True,
        "superlinear": False,
    }
    if len(set(xs)) < 3:
        return out
    quad = np.column_stack([np.ones_like(x), x, x * x])
    beta, *_ = np.linalg.lstsq(quad, y, rcond=None)
    qa, qb, qc = (float(v) for v in beta)
    xmax = float(x.max())
    total = qa + qb * xmax + qc * xmax * xmax
    q: dict[str, Any] = {"a": qa, "b": qb, "c": qc, "se_c": None, "t": None, "p": None,
                         "share_at_max": qc * xmax * xmax / total if total else None}  # fmt: skip
    dof = len(xs) - 3
    rss = float(((y - quad @ beta) ** 2).sum())
    if dof > 0:
        cov = rss / dof * np.linalg.inv(quad.T @ quad)
        se = math.sqrt(max(0.0, float(cov[2, 2])))
        q["se_c"] = se
        q["t"] = qc / se if se > 0 else math.copysign(math.inf, qc)
        q["p"] = t_pvalue(q["t"], dof)
    out["quad"] = q
    significant = q["p"] is not None and q["p"] < SIGNIFICANT
    matters = q["share_at_max"] is not None and abs(q["share_at_max"]) >= NEGLIGIBLE
    out["linear"] = not (significant and matters)
    out["superlinear"] = significant and matters and qc > 0
    return out


def fit_all(points: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """Per source: the time fit over the best run of each size (x = GB of tensors; on a shared machine the noise
    only adds time, so the best of N is the load's own cost), the same over every run, and the overhead fit over
    the medians.

    Returns:
        ``{source: {"time": fit, "time_all": fit, "overhead": {"a", "b", "change", "constant", "min", "max"}}}``
        (seconds; bytes, per GB).
    """
    out: dict[str, Any] = {}
    for src in sources:
        pts = sorted((p for p in points if p["source"] == src), key=lambda p: p["bytes"])
        xs = [p["bytes"] / 1e9 for p in pts for _ in p["runs"]]
        ys = [r["seconds"] for p in pts for r in p["runs"]]
        mx = [p["bytes"] / 1e9 for p in pts]
        mem = fit(mx, [p["overhead"] for p in pts])
        change = mem["b"] * (max(mx) - min(mx)) if len(mx) > 1 else 0.0
        out[src] = {
            "time": fit(mx, [p["min_s"] for p in pts]),
            "time_all": fit(xs, ys),
            "overhead": {
                "a": mem["a"],
                "b": mem["b"] if len(set(mx)) > 1 else 0.0,
                "change": change,
                "constant": abs(change) < MEM_TOLERANCE,
                "min": min(p["overhead"] for p in pts),
                "max": max(p["overhead"] for p in pts),
            },
        }
    return out


def verdict(f: dict[str, Any]) -> str:
    """One sentence on a source's fits."""
    t, m = f["time"], f["overhead"]
    q = t["quad"]
    words = f"time = {t['a']:.3f} s + {t['b']:.3f} s/GB × size ({1 / t['b']:.2f} GB/s marginal), " if t["b"] > 0 else ""
    words += f"R² {t['r2']:.4f}, residual RMS {t['rms'] * 1e3:.1f} ms; "
    if q is None:
        words += "too few sizes for a quadratic term; "
    else:
        p = "n/a" if q["p"] is None else f"{q['p']:.2g}"
        share = "n/a" if q["share_at_max"] is None else f"{100 * q['share_at_max']:+.1f} %"
        words += f"quadratic term c = {q['c']:+.4f} s/GB² (p = {p}, share at the largest size {share}): "
    words += "**linear**" if t["linear"] else ("**super-linear**" if t["superlinear"] else "**not linear**")
    words += (f". Overhead {m['min'] / MiB:.1f}–{m['max'] / MiB:.1f} MiB, fitted change across the sizes "
              f"{m['change'] / MiB:+.1f} MiB: **{'constant' if m['constant'] else 'grows'}**.")  # fmt: skip
    return words


def format_table(results: dict[str, Any]) -> str:
    """Markdown: one row per (size, source), then one verdict line per source."""
    lines = [
        "| size GB | layers | tensors | source | strategy | best s | median s | max s | GB/s (best) | overhead MiB | "
        "anon growth MiB | file growth MiB | residual ms |",
        "|---" * 13 + "|",
    ]
    fits = results["fits"]
    for p in sorted(results["points"], key=lambda p: (p["source"], p["bytes"])):
        f = fits[p["source"]]["time"]
        resid = p["min_s"] - (f["a"] + f["b"] * p["bytes"] / 1e9)
        lines.append(
            f"| {p['bytes'] / 1e9:.3f} | {p['layers']} | {p['tensors']} | {p['source']} | {p['strategy']} | "
            f"{p['min_s']:.3f} | {p['median_s']:.3f} | {p['max_s']:.3f} | {p['bytes'] / 1e9 / p['min_s']:.2f} | "
            f"{p['overhead'] / MiB:.1f} | {p['anon_growth'] / MiB:.1f} | {p['file_growth'] / MiB:.1f} | "
            f"{resid * 1e3:+.1f} |"
        )
    lines.append("")
    runs = f"{results['runs']} fresh processes per row ({results['warmup']} warm-up first), warm page cache"
    lines.append(f"Seconds = load + one byte read per page, {runs}; fits over the best run of each size; "
                 "residual = best − linear fit; overhead: median.")  # fmt: skip
    if results.get("http_server"):
        lines.append(f"HTTP server: {results['http_server']}.")
    lines += ["", *(f"- **{src}**: {verdict(f)}" for src, f in fits.items())]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | Path) -> bool:
    """Two panels: seconds against GB (every run, linear and quadratic fits) and overhead MiB against GB;
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return False
    fig, (ax, mx) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"local": "#1b9e77", "http": "#d95f02"}
    top = max(p["bytes"] for p in results["points"]) / 1e9
    grid = np.linspace(0, top * 1.03, 100)
    for src, f in results["fits"].items():
        pts = sorted((p for p in results["points"] if p["source"] == src), key=lambda p: p["bytes"])
        c = colors.get(src)
        xs = [p["bytes"] / 1e9 for p in pts for _ in p["runs"]]
        ys = [r["seconds"] for p in pts for r in p["runs"]]
        t = f["time"]
        ax.plot(xs, ys, ".", color=c, alpha=0.35, ms=5, label=f"{src}: every run")
        ax.plot([p["bytes"] / 1e9 for p in pts], [p["min_s"] for p in pts], "o", color=c, ms=5,
                label=f"{src}: best of {results['runs']}")  # fmt: skip
        ax.plot(grid, t["a"] + t["b"] * grid, "-", color=c, lw=1.2,
                label=f"{src}: {t['a']:.3f} + {t['b']:.3f}·GB (R² {t['r2']:.3f})")  # fmt: skip
        q = t["quad"]
        if q is not None:
            ax.plot(grid, q["a"] + q["b"] * grid + q["c"] * grid**2, ":", color=c, lw=1, label=f"{src}: quadratic fit")
        gb = [p["bytes"] / 1e9 for p in pts]
        med = np.array([p["overhead"] for p in pts]) / MiB
        err = [med - np.array([min(r["overhead"] for r in p["runs"]) for p in pts]) / MiB,
               np.array([p["overhead_max"] for p in pts]) / MiB - med]  # fmt: skip
        mx.errorbar(gb, med, yerr=err, fmt="o-", color=c, capsize=3, label=src)
    ax.set_xlabel("model size (GB of bf16 tensors)")
    ax.set_ylabel("seconds (load + touch every page)")
    ax.set_title("load time, fresh process, warm page cache", fontsize=10)
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    mx.set_xlabel("model size (GB of bf16 tensors)")
    mx.set_ylabel("MiB: peak RSS − RSS before − tensor bytes")
    mx.set_title("memory beyond the tensors (median, min–max)", fontsize=10)
    mx.set_xlim(0, top * 1.05)
    mx.axhline(0, color="#888888", lw=0.6)
    mx.legend(fontsize=8)
    fig.suptitle(f"hf_tensorizer default CPU load vs size — {results.get('machine', '')}, {results.get('date', '')}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
