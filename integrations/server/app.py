"""The HTTP side: a FastAPI app speaking the KServe V1 REST protocol around a :class:`ModelRunner`.

Routes:

* ``GET /`` and ``GET /v2/health/live`` — liveness: 200 as soon as the process serves HTTP.
* ``GET /v2/health/ready`` — 200 once the weights are loaded, 503 before.
* ``GET /v1/models`` — ``{"models": [name]}``.
* ``GET /v1/models/{name}`` — readiness of the model: 200 ``{"name", "ready": true, ...}``, 503 while loading.
* ``POST /v1/models/{name}:predict`` — ``{"instances": [...], "parameters": {...}}`` → ``{"predictions": [...]}``;
  503 while loading (or, with ``ready_wait_s``, held until the weights are in), 400 for a malformed body (also
  one nested too deep to parse, a lone surrogate, a prompt over the input cap), 404 for another model name, 405 for
  another method.

The weights load on a background thread started with the app, so liveness answers during the load (as a
KServe predictor does) and readiness flips when they are in memory. A failed load calls ``on_load_failure``
(the CLI stops the server and exits non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from hf_tensorizer.sources import redact

from .model import BadRequest, ModelRunner

log = logging.getLogger("integrations.server")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(runner: ModelRunner, on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The FastAPI app for ``runner``; loading starts when the app starts (lifespan).

    Args:
        runner: the model runner (not loaded yet).
        on_load_failure: called with the reason when loading fails.

    Returns:
        The app, ready for uvicorn.
    """
    name = runner.config.model_name
    started = time.time()

    def load() -> None:
        try:
            runner.load()
        except BaseException:
            log.exception("model load failed")
            if on_load_failure is not None:
                on_load_failure(runner.error or "unknown error")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="model-load", daemon=True).start()
        yield
        runner.shutdown()

    app = FastAPI(title="hf_tensorizer inference server", lifespan=lifespan)

    def status() -> dict[str, Any]:
        return {"name": name, "ready": runner.ready.is_set(), "task": runner.task, "loader": runner.config.loader,
                "model_uri": redact(runner.config.model_uri), "precision": runner.config.precision,
                "load_seconds": runner.load_seconds, "uptime_seconds": time.time() - started,
                **({"error": runner.error} if runner.error else {})}  # fmt: skip

    @app.get("/")
    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"status": "alive", "live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        return JSONResponse(status(), status_code=200 if runner.ready.is_set() else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": [name]}

    @app.api_route("/v1/models/{model}:predict", methods=["GET", "HEAD", "PUT", "PATCH", "DELETE"])
    async def predict_wrong_method(model: str) -> JSONResponse:
        # without this route GET .../m:predict matches /v1/models/{model} with model "m:predict": a 404
        response = _error(405, "predict takes POST")
        response.headers["Allow"] = "POST"
        return response

    @app.get("/v1/models/{model}")
    async def model_status(model: str) -> JSONResponse:
        if model != name:
            return _error(404, f"model {model!r} not found; this server serves {name!r}")
        return JSONResponse(status(), status_code=200 if runner.ready.is_set() else 503)

    @app.post("/v1/models/{model}:predict")
    async def predict(model: str, request: Request) -> JSONResponse:
        if model != name:
            return _error(404, f"model {model!r} not found; this server serves {name!r}")
        if not runner.finished.is_set() and runner.config.ready_wait_s > 0:
            # park the request on a thread blocked on the event: costs no CPU while the load runs
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, runner.finished.wait, runner.config.ready_wait_s)
        if not runner.ready.is_set():
            return _error(503, f"model {name!r} is not ready: " + (runner.error or "weights are loading"))
        try:
            body = await request.json()
        except ValueError as exc:
            return _error(400, f"body is not valid JSON: {exc}")
        except RecursionError:  # json's decoder recurses per nesting level
            return _error(400, "body is not valid JSON: nested too deep")
        try:
            instances = runner.parse(body)
            predictions = await asyncio.wrap_future(runner.submit(instances))
        except BadRequest as exc:
            return _error(400, str(exc))
        return JSONResponse({"predictions": predictions})

    return app
