"""KServe predictor loading through hf_tensorizer, on the kserve SDK: ``python -m integrations.server --help``.

``model`` (loading, execution) and ``validation`` need no kserve; ``predictor``, ``guard`` and ``app`` do. Names
are imported on first use (PEP 562): the CLI parses its flags and starts the weights snapshot before torch,
transformers or kserve are imported (``snapshot``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BadRequest", "ModelRunner", "ServerConfig"]
_WHERE = {"BadRequest": ".validation", "ModelRunner": ".model", "ServerConfig": ".config"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
