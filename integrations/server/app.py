"""The server: KServe's ``ModelServer`` (REST only) hosting one :class:`TensorizedModel`, plus the guard.

Routes come from the SDK (``kserve.protocol.rest``):

* ``GET /``, ``GET /v2/health/live`` — liveness: 200 as soon as the process serves HTTP;
* ``GET /v1/models/<name>``, ``GET /v2/models/<name>/ready`` — readiness of the model: 503 until the weights
  are in (and while the queue is full), then 200; ``GET /v2/health/ready`` is the server's (always 200);
* ``POST /v1/models/<name>:predict`` (V1) and ``POST /v2/models/<name>/infer`` (V2, Open Inference Protocol);
* ``GET /v1/models``, ``GET /v2/models``, ``GET /v2/models/<name>`` (metadata), ``GET /v2`` (server metadata);
* ``GET /metrics`` — Prometheus: the SDK's latency histograms plus this server's queue / shed / cancelled /
  timed-out counters and the load time.

The weights load on a thread started before the HTTP server, so liveness answers during the load. A failed load
stops the server: :func:`serve` returns the reason (the CLI prints it and exits 1), a pod goes to
``CrashLoopBackOff``. So does a load still running after ``--load-timeout`` seconds (a watchdog thread): a source
that accepts the connection and never answers cannot keep the pod unready forever.

Not-ready answers (readiness probes and predicts while loading, a full queue) are the guard's quiet 503s: one log
line when the state changes, not the SDK's ``ModelNotReady`` traceback per poll.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from hf_tensorizer.errors import LoadTimeoutError

from .guard import Guard
from .model import ModelRunner, ServerConfig
from .predictor import ClientGone, RequestTimeout, TensorizedModel, kserve
from .snapshot import Snapshot

if TYPE_CHECKING:
    from hf_tensorizer.engine.lease import FileLease

log = logging.getLogger("integrations.server")


class PredictorServer(kserve.ModelServer):
    """``kserve.ModelServer`` that binds ``host`` (the SDK binds 0.0.0.0) and can be stopped from a thread.

    Args:
        host: bind address.
        port: HTTP port.
        latency_logging: the SDK's per-request latency log line.
    """

    def __init__(self, host: str, port: int, latency_logging: bool = False) -> None:
        super().__init__(http_port=port, enable_grpc=False, enable_latency_logging=latency_logging,
                         grace_period=5)  # fmt: skip
        self.host = host
        self._stop_requested = False
        self._lock = threading.Lock()

    def setup_event_loop(self) -> None:
        # start() calls this after it built the REST server and before it runs it: the one place to set the host
        with self._lock:
            if self._rest_server is not None:
                self._rest_server.config.host = self.host
                if self._stop_requested:  # the load failed before the server existed
                    self._rest_server._server.should_exit = True
        super().setup_event_loop()

    def stop_serving(self) -> None:
        """Ask the HTTP server to exit (from any thread): uvicorn checks the flag every 0.1 s."""
        with self._lock:
            self._stop_requested = True
            if self._rest_server is not None:
                self._rest_server._server.should_exit = True


def _client_gone(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=499)  # nginx's "client closed request": nobody reads it


def _timed_out(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=504)


def build(config: ServerConfig, host: str = "127.0.0.1", port: int = 8080, snapshot: Snapshot | None = None,
          lease: FileLease | None = None,
          no_lease: str | None = None) -> tuple[PredictorServer, TensorizedModel]:  # fmt: skip
    """The server and its (unloaded) model, with the guard and error handlers installed on the SDK's app.

    Args:
        config: the model and its limits.
        host: bind address.
        port: HTTP port.
        snapshot: the weights snapshot the CLI started (:mod:`~integrations.server.snapshot`), if any.
        lease: the read lease the CLI took on the weights file instead, if any.
        no_lease: why the CLI took no lease (logged by the load), if it tried.

    Returns:
        ``(server, model)``; start with :func:`serve`.
    """
    model = TensorizedModel(ModelRunner(config, snapshot, lease=lease, no_lease=no_lease))
    server = PredictorServer(host, port, latency_logging=logging.getLogger().isEnabledFor(logging.DEBUG))
    server.register_model(model)  # registered unready: the SDK answers 503 for it until load() sets ready
    app: FastAPI = kserve.model_server.app  # the SDK serves this module-level app
    app.add_middleware(Guard, model=model)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(RequestTimeout, _timed_out)
    return server, model


def serve(server: PredictorServer, model: TensorizedModel) -> tuple[str | None, bool]:
    """Load the model on a thread, watch it, and serve until stopped.

    Returns:
        ``(reason, hung)``: ``(None, False)`` after a clean stop; the reason when the model failed to load (the
        server stopped itself), with ``hung`` True when the load was still running past ``--load-timeout`` (its
        threads may never return: the caller should not wait for them).
    """
    failure: list[str] = []
    lock = threading.Lock()
    runner = model.runner

    def fail(reason: str) -> None:
        with lock:
            if not failure:
                failure.append(reason)
        server.stop_serving()

    def load() -> None:
        try:
            model.load()
        except BaseException:
            log.exception("model load failed")
            fail(runner.error or "unknown error")

    def watchdog(limit: float) -> None:
        if runner.finished.wait(limit):
            return
        err = LoadTimeoutError(f"the model was still loading after {limit:g} s (--load-timeout); a source that "
                               "accepts connections and never answers, or a disk that stopped?")  # fmt: skip
        log.error("%s: %s", type(err).__name__, err)
        fail(f"{type(err).__name__}: {err}")

    threading.Thread(target=load, name="model-load", daemon=True).start()
    if runner.config.load_timeout_s > 0:
        threading.Thread(target=watchdog, args=(runner.config.load_timeout_s,), name="load-watchdog",
                         daemon=True).start()  # fmt: skip
    server.start([])  # the model is registered already; start() would refuse one that is not ready yet
    if not failure:
        return None, False
    return failure[0], not runner.finished.is_set()


def route_paths() -> set[str]:
    """The paths KServe's REST server registers (what the manifests' probes may use)."""
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    app = FastAPI()
    plane = DataPlane(model_registry=ModelRepository())
    register_v1_endpoints(app, plane, None)
    register_v2_endpoints(app, plane, None)
    return {"/", "/metrics"} | set(app.openapi()["paths"])  # the schema lists included routers' routes too


def set_log_level(level: str) -> None:
    """Apply ``--log-level`` to ours, the SDK's and uvicorn's loggers (the SDK configures them at INFO)."""
    value = level.upper()
    for name in ("integrations.server", "kserve", "uvicorn", "uvicorn.error", "uvicorn.access", "hf_tensorizer"):
        logging.getLogger(name).setLevel(value)
    logging.getLogger("uvicorn.access").addFilter(_quiet_probes)
    # the SDK's timing middleware logs every request at INFO on kserve.trace
    logging.getLogger("kserve.trace").setLevel("DEBUG" if value == "DEBUG" else "WARNING")


def _quiet_probes(record: logging.LogRecord) -> bool:
    """Drop uvicorn's access lines for not-ready answers (503): the guard logs each state change once."""
    args = record.args
    return not (isinstance(args, tuple) and len(args) >= 5 and args[4] == 503)
