"""Load-time benchmark: our loader against its peers, in fresh processes, warm and cold.

``hf-tensorizer bench`` (or ``python -m hf_tensorizer.bench.runner``) prepares a Llama-shaped bf16
checkpoint in several formats, measures the machine's limits and times every loader; see runner.py.
Names are imported lazily, so that ``python -m hf_tensorizer.bench.runner`` runs a fresh module.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "add_bench_arguments": "runner",
    "bench_main": "runner",
    "main": "runner",
    "prepare": "checkpoint",
    "run_bench": "runner",
    "run_one": "runner",
    "format_table": "report",
    "write_report": "report",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
