"""KServe V1 REST inference server loading through hf_tensorizer: ``python -m integrations.server --help``."""

from .model import BadRequest, ModelRunner, ServerConfig

__all__ = ["BadRequest", "ModelRunner", "ServerConfig", "create_app"]


def create_app(*args, **kwargs):  # noqa: ANN002, ANN003 - lazy: importing FastAPI is not needed for the CLI parser
    """See :func:`integrations.server.app.create_app`."""
    from .app import create_app as _create

    return _create(*args, **kwargs)
