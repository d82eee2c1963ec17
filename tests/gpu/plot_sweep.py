"""Plot the staging-pool sweep (tests/gpu/sweep.py's log) as docs/img/h200-sweep.png.

python tests/gpu/plot_sweep.py docs/data/h200-2026-11-26-sweep.log docs/img/h200-sweep.png
"""

from __future__ import annotations

import json
import sys


def main(log: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    with open(log, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    for line in lines:
        if line.startswith('{"staging_allocation"'):
            r = json.loads(line)
            rows.append((f"{r['staging_allocation']} {r['num_readers']}r {r['chunk_bytes'] >> 20}MiB", r["GBs"]))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    labels, values = zip(*rows)
    ax.barh(range(len(rows)), values, color=["#2a7" if "hugepage" in n else "#789" for n in labels])
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.axvline(55.4, ls="--", c="k", lw=1, label="pinned H2D limit 55.4")
    ax.set_xlabel("GB/s, 6.46 GB to an H200, page cache warm, best of 2 in one process")
    ax.set_title("staging pool: allocation, readers, chunk size")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
