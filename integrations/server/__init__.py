"""KServe V1 REST inference server loading through hf_tensorizer: ``python -m integrations.server --help``."""

from typing import Any

from .model import BadRequest, ModelRunner, ServerConfig

__all__ = ["BadRequest", "ModelRunner", "ServerConfig", "create_app"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`integrations.server.app.create_app` (imported lazily: the CLI parser needs no FastAPI)."""
    from .app import create_app as _create

    return _create(*args, **kwargs)
