"""KServe predictor loading through hf_tensorizer, on the kserve SDK: ``python -m integrations.server --help``.

``model`` (loading, execution) and ``validation`` need no kserve; ``predictor``, ``guard`` and ``app`` do (imported
lazily, so the CLI parser and the manifest tests load without it).
"""

from .model import ModelRunner, ServerConfig
from .validation import BadRequest

__all__ = ["BadRequest", "ModelRunner", "ServerConfig"]
